"""Pipeline steps of the LoRA experiment: plain functions of (config, paths) that Airflow
calls and that tests and the `loraflow` command call without Airflow."""
