"""Sans-I/O HTTP/1.1: message heads, header rules and framing. No sockets here."""
