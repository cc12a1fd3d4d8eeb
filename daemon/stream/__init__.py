"""The daemon's streaming room: Kafka in, SVI steps, snapshots to Redis, offsets committed."""
