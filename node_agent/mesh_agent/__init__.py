"""mesh node agent: device inventory, health and heartbeat of one node."""
