"""The one error type for what a user gave us (configs, data, model paths, checkpoints)."""


class BadInputError(ValueError):
    """Something the user gave (config, data, model path, checkpoint) is unusable. The CLI prints
    the message alone: it names the file, row, key or path and what is wrong."""
