"""boost-agent: the device side of MLInferBooster.

Also holds the contracts both sides share (configuration, artifact format, signatures), because the
device must be able to check them without the build host's dependencies.
"""

__version__ = "0.1.0"
