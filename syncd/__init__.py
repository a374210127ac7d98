"""syncd: keeps upload directories safe in S3."""

__version__ = "0.1.0"
