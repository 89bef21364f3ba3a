"""balancer"""
