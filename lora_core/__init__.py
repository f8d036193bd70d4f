"""LoRA from scratch (Hu et al. 2021, arXiv:2106.09685) for BERT-family encoders."""
