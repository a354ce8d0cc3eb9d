"""The HTTP API for the order system: validates, calls the services, renders JSON."""
