"""driver-ctr: the NVIDIA GPU driver container's entrypoint and builder.

The driver container side lives in this package; ``driver_ctr.toolkit`` is the
part that also runs inside the Driver Toolkit (DTK) image, on its Python 3.9,
from a zipapp. Imports go one way: this package may import the toolkit, the
toolkit never imports this package.
"""

__version__ = "0.1.0"
