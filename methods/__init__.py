"""Built-in LTR methods, one module each, registered through the `harness.methods` entry points."""
