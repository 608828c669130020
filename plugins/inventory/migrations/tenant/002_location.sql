-- fleet:version 1.1.0
-- Adding a nullable column without a default is a catalog-only change; the index is
-- built in the same transaction while the table is small (one tenant's items).
ALTER TABLE items ADD COLUMN location text;
CREATE INDEX items_location_idx ON items (location);
