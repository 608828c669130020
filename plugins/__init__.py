"""The plugins that ship with tenantfleet. Each subpackage is one plugin (see host/discovery.py)."""
