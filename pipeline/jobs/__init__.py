"""Jobs: the store that persists generations across replicas (`tables`, `store`'s queries,
`leases` with their fencing, `records` it returns), the run of one claimed job (`run`), the
job `worker` that claims and runs jobs, the HTTP status shape (`status`), the progress event
stream (`events`), admission `limits`, `retention` and the schema `migrations`. Nothing is imported here, so a module of this package
never pulls in the others."""

# The modules other rooms may import (tests/test_layout.py holds the rest of the product to them);
# the tables, the leases' fencing and the migrations are the store's own.
__all__ = ["events", "limits", "records", "retention", "run", "status", "store", "worker"]
