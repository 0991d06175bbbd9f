"""TorchX components and the entry points they run (the only code that owns process groups)."""
