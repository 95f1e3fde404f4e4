"""overlock: design, build, measure and train OverLoCK-style ConvNets from declarative specs."""

__version__ = "0.1.0"
