"""tffpipe: TensorFlow Federated pipelines for mobile-style federated learning.

Importing the package has no side effects. `tffpipe.environment.check()` tells
whether the interpreter and the pinned packages are the ones tffpipe needs; every
binary runs it before anything heavy is imported (`experiments.cli`).
"""
