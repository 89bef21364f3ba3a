"""PIBL: an HTTP/1.1 reverse proxy, load balancer and shared cache."""

__version__ = "0.1.0"
