"""The local admin page: JSON API, live events, metrics, zeroconf (see API.md).

Importing the package stays light (the config loader imports `appliance.web.config`)."""
