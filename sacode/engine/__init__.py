"""The fine-tuning engine (chapters 8-12): policies, value learning, algorithms, the trainer and its configuration.
The same code drives every environment; it is handed a task and imports no environment."""
