"""One module per method of the registry (tasks/registry.py), named after it.

A baseline's module provides

    predict(job: tasks.variants.Job) -> tasks.variants.Predictions

which fits whatever the baseline fits on the training subset (choices on the training or
validation subset only), fills `job.record` (parameters, timings, latency, notes) and
returns P(positive) for every validation and test row. It raises
`tasks.variants.NotApplicable(reason)` when it cannot run on the run's model.

A trained method's module provides what differs between gradient-trained methods; the
loop, the record and the evaluation are tasks.train's:

    make_trainable(model, job) -> None     # set requires_grad, add method details to job.record
    save(model, job, folder: Path) -> None # write the trained model into `folder`

and, for a method the registry marks `mergeable`,

    merge(model) -> None                   # fold the adaptation into the base weights
    bare(model) -> ContextManager          # the model without its adaptation, for timing
"""
