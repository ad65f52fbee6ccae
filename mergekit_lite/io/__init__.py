"""Reading model folders lazily, resolving Hub ids, and writing sharded outputs atomically."""
