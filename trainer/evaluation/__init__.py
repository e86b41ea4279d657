"""Reading a model's answers and scoring them: greedy decoding under the trial's attention layout, exact match
with its interval and character error rate. A layer under the job (which evaluates during training), `predict` and
the held-out test; it may import the model, the data's batching and the trainer's base."""
