"""One module per method of the registry (tasks/registry.py), named after it.

The contract is tasks/job.py: a method's module imports it (never the dispatcher,
tasks.variants) and gets a `Job` (variant, config, run paths, record, device, and the
precision the run's setting resolved to on that device: use `job.dtype`, record
`job.precision`).

A baseline's module provides (`tasks.job.Baseline`)

    predict(job: tasks.job.Job) -> tasks.job.Predictions

which fits whatever the baseline fits on the training subset (choices on the training or
validation subset only), fills `job.record` (parameters, timings, latency, notes) and
returns P(positive) for every validation and test row. It raises
`tasks.job.NotApplicable(reason)` when it cannot run on the run's model.

A trained method's module provides what differs between gradient-trained methods
(`tasks.job.TrainedMethod`); the loop, the record and the evaluation are tasks.train's:

    make_trainable(model, job) -> None     # set requires_grad, add method details to job.record
    save(model, job, folder: Path) -> None # write the trained model into `folder`

and, for a method the registry marks `mergeable` (`tasks.job.MergeableMethod`),

    merge(model) -> None                   # fold the adaptation into the base weights
    bare(model) -> ContextManager          # the model without its adaptation, for timing
"""
