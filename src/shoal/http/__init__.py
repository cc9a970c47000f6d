"""HTTP ingress: the proxy process, route matching, and request/response conversion."""
