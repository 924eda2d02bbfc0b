"""tffpipe: TensorFlow Federated pipelines for mobile-style federated learning.

Importing the package checks the environment first, so a wrong interpreter or
package version stops here with one readable message instead of deep in TF.
"""

from tffpipe import environment

environment.check()
