"""Service glue: systemd notifications, the Windows service."""
