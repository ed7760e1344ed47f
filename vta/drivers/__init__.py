"""VTA drivers, one module per backend behind the ``Driver`` protocol of ``vta.drivers.base``."""
