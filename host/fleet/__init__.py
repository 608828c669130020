"""The embedded dev fleet: PostgreSQL and Valkey servers from wheels (`embedded`) and the
demo set-up `tenantfleet up` creates on them (`demo`). Apart from the request path: only
the CLI, the tests and the benchmarks import it."""
