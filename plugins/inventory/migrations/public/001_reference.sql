-- fleet:version 1.0.0
-- Shared by every tenant on the shard (public scope).
CREATE TABLE IF NOT EXISTS inventory_units (
    code        text PRIMARY KEY,
    name        text NOT NULL,
    per_base    numeric NOT NULL DEFAULT 1
);
INSERT INTO inventory_units (code, name, per_base) VALUES
    ('ea', 'each', 1),
    ('dz', 'dozen', 12),
    ('kg', 'kilogram', 1),
    ('g', 'gram', 0.001)
ON CONFLICT (code) DO NOTHING;
