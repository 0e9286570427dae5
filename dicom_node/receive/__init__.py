"""Receiving: the Storage SCP, the header check and durable storage of each instance."""
