-- The audit trail: the trigger, context capture, append-only refusals,
-- enable/disable, sealing and verification.
\set SHOW_CONTEXT never

CREATE TABLE app.accounts (id int PRIMARY KEY, owner text, balance numeric,
						   opened_at timestamptz, tags text[]);

-- The last audit rows of a table, in the order they were written (audit_id
-- alone does not tell: each session takes its ids from a cache of its own).
CREATE FUNCTION app.audit_of(tbl text, n int DEFAULT 20)
RETURNS TABLE (operation text, row_key jsonb, old_row jsonb, new_row jsonb, actor text,
			   reason text, db_user text, with_run boolean, with_step boolean)
LANGUAGE sql AS $$
	SELECT operation, row_key, old_row, new_row, actor, reason, db_user,
		   run_id IS NOT NULL, step_id IS NOT NULL
	  FROM (SELECT * FROM orch.audit_log WHERE table_name = tbl ORDER BY xid DESC, audit_id DESC LIMIT n) l
	 ORDER BY xid, audit_id
$$;

-- Enabling the audit of a table is itself recorded.
SELECT orch.enable_audit('app.accounts');
SELECT orch.enable_audit('app.accounts') AS again;

-- The application names its actor and reason for one transaction.  Values
-- are rendered the same whatever the session's settings: timestamps in UTC.
SET TimeZone = 'America/New_York';
SET DateStyle = 'SQL, DMY';
BEGIN;
SELECT orch.set_audit_context('alice@example.com', 'ticket 4711: open accounts');
INSERT INTO app.accounts VALUES
	(1, 'Ada', 100.50, '2026-01-02 03:04:05.678901+01', '{vip}'),
	(2, 'Bob', 20, NULL, '{}');
COMMIT;
RESET TimeZone;
RESET DateStyle;

-- An UPDATE records the columns it changed, before and after; the context
-- was for that transaction only.
UPDATE app.accounts SET balance = balance + 1, tags = '{vip,gold}' WHERE id = 1;
UPDATE app.accounts SET owner = owner WHERE id = 2;
DELETE FROM app.accounts WHERE id = 2;
SELECT * FROM app.audit_of('app.accounts');

-- A change a sql step makes carries its run and step, with no work by the
-- step's author; the orchestrator's own rows carry them from their columns.
CREATE FUNCTION app.credit(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	UPDATE app.accounts SET balance = balance + (ctx->'input'->>'amount')::numeric WHERE id = 1;
	SELECT '{"credited": true}'::jsonb
$$;
SELECT orch.define_workflow('credit', '{"steps": [{"name": "credit", "kind": "sql", "function": "app.credit"}]}');
SELECT orch.start_run('credit', '{"amount": 5}') AS credit_run \gset
SELECT orch.wait_run(:'credit_run');
SELECT l.operation, l.old_row, l.new_row, l.run_id = :'credit_run' AS its_run,
	   l.step_id = s.step_id AS its_step
  FROM orch.audit_log l JOIN orch.steps s ON s.run_id = :'credit_run' AND s.name = 'credit'
 WHERE l.table_name = 'app.accounts' AND l.operation = 'UPDATE' AND l.run_id IS NOT NULL;
SELECT table_name, operation, count(*) AS rows, bool_and(run_id = :'credit_run') AS of_the_run
  FROM orch.audit_log
 WHERE run_id = :'credit_run'
 GROUP BY 1, 2 ORDER BY 1, 2;

-- TRUNCATE of an audited table is recorded as one event.
CREATE TABLE app.scratch (k int PRIMARY KEY);
SELECT orch.enable_audit('app.scratch');
INSERT INTO app.scratch SELECT generate_series(1, 3);
TRUNCATE app.scratch;
SELECT operation, row_key FROM app.audit_of('app.scratch');

-- Disabling is recorded too; later changes are not.
SELECT orch.disable_audit('app.scratch');
INSERT INTO app.scratch VALUES (4);
SELECT operation, row_key, new_row FROM app.audit_of('app.scratch', 2);
SELECT orch.disable_audit('app.scratch') AS again;
-- A trigger disabled by hand: enabling the audit again repairs it.
SELECT orch.enable_audit('app.scratch');
ALTER TABLE app.scratch DISABLE TRIGGER orch_audit_insert;
SELECT orch.enable_audit('app.scratch') AS repaired;
SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = 'app.scratch'::regclass ORDER BY 1;
INSERT INTO app.scratch VALUES (5);
SELECT operation, row_key FROM app.audit_of('app.scratch', 1);
SELECT orch.disable_audit('app.scratch');

-- Bad calls.
CREATE VIEW app.accounts_view AS SELECT * FROM app.accounts;
CREATE TABLE app.no_key (v text);
CREATE ROLE audit_stranger;
GRANT orch_admin TO audit_stranger;
SELECT app.show_error($$SELECT orch.enable_audit('orch.runs')$$);
SELECT app.show_error($$SELECT orch.enable_audit('app.accounts_view')$$);
SELECT app.show_error($$SELECT orch.enable_audit('app.missing')$$);
CREATE TABLE app.parted (k int PRIMARY KEY) PARTITION BY RANGE (k);
SELECT app.show_error($$SELECT orch.enable_audit('app.parted')$$);
SET ROLE audit_stranger;
SELECT app.show_error($$SELECT orch.disable_audit('app.accounts')$$);
RESET ROLE;
SELECT orch.enable_audit('app.no_key');
INSERT INTO app.no_key VALUES ('x');
SELECT operation, row_key, new_row FROM app.audit_of('app.no_key', 1);

-- A table's columns, key and name are read again after it changes: a
-- column added, then dropped, a primary key made, the table and its schema
-- renamed, each within the one session that audits the table throughout.
CREATE SCHEMA shop;
CREATE TABLE shop.items (sku text, price numeric);
SELECT orch.enable_audit('shop.items');
INSERT INTO shop.items VALUES ('a-1', 5);
ALTER TABLE shop.items ADD COLUMN stock int DEFAULT 3;
INSERT INTO shop.items VALUES ('b-2', 7);
ALTER TABLE shop.items DROP COLUMN price, ADD PRIMARY KEY (sku);
UPDATE shop.items SET stock = 4 WHERE sku = 'b-2';
ALTER TABLE shop.items RENAME TO goods;
DELETE FROM shop.goods WHERE sku = 'a-1';
ALTER SCHEMA shop RENAME TO store;
INSERT INTO store.goods VALUES ('c-3', 1);
SELECT table_name, operation, row_key, old_row, new_row
  FROM orch.audit_log WHERE table_name IN ('shop.items', 'shop.goods', 'store.goods')
 ORDER BY xid, audit_id;

-- orch_reader reads the events, which orch.audit_log unpacks from the records.
CREATE ROLE audit_reader IN ROLE orch_reader;
SET ROLE audit_reader;
SELECT count(*) AS events, count(DISTINCT audit_id / 1000) AS records
  FROM orch.audit_events WHERE table_name IN ('shop.items', 'shop.goods', 'store.goods');
RESET ROLE;
-- A transaction's events go to one record, written when it commits: a
-- savepoint rolled back takes its events with it, a released one keeps
-- them.
BEGIN;
SELECT pg_current_xact_id() AS tx \gset
INSERT INTO store.goods VALUES ('d-4', 1);
SAVEPOINT a;
INSERT INTO store.goods VALUES ('e-5', 1);
ROLLBACK TO a;
SAVEPOINT b;
UPDATE store.goods SET stock = 9 WHERE sku = 'd-4';
RELEASE b;
SELECT count(*) AS seen_before_commit FROM orch.audit_log WHERE xid = :'tx';
COMMIT;
SELECT operation, row_key, old_row, new_row, record_id = min(record_id) OVER () AS one_record
  FROM orch.audit_log WHERE xid = :'tx' ORDER BY audit_id;
-- The transaction locks orch.audit_records with its first event, and
-- keeps the lock when the savepoint of that event rolls back.
BEGIN;
SAVEPOINT a;
INSERT INTO store.goods VALUES ('k-1', 1);
ROLLBACK TO a;
SELECT count(*) AS audit_records_locked FROM pg_locks
 WHERE locktype = 'relation' AND relation = 'orch.audit_records'::regclass
   AND pid = pg_backend_pid() AND mode = 'RowExclusiveLock';
ROLLBACK;
-- So does an exception block; the events of a nested savepoint released
-- into one rolled back go with it.
BEGIN;
SELECT pg_current_xact_id() AS tx \gset
INSERT INTO store.goods VALUES ('l-1', 1);
DO $$BEGIN
	INSERT INTO store.goods VALUES ('l-2', 1);
	RAISE EXCEPTION 'undone';
EXCEPTION WHEN raise_exception THEN NULL;
END$$;
SAVEPOINT c;
INSERT INTO store.goods VALUES ('l-3', 1);
SAVEPOINT d;
INSERT INTO store.goods VALUES ('l-4', 1);
RELEASE d;
ROLLBACK TO c;
DO $$BEGIN INSERT INTO store.goods VALUES ('l-5', 1); END$$;
COMMIT;
SELECT r.n_events, l.new_row->>'sku' AS sku
  FROM orch.audit_records r JOIN orch.audit_log l USING (record_id)
 WHERE r.xid = :'tx' ORDER BY l.audit_id;
-- A record holds at most 1,000 events.  Outside any savepoint, a full
-- record is written at once; in a savepoint, the rest of a statement's
-- events go to records of their own, which go if it rolls back.
BEGIN;
SELECT pg_current_xact_id() AS tx \gset
INSERT INTO store.goods SELECT 'h-' || i, i FROM generate_series(1, 998) i;
SAVEPOINT e;
INSERT INTO store.goods SELECT 'i-' || i, i FROM generate_series(1, 5) i;
RELEASE e;
SAVEPOINT f;
INSERT INTO store.goods SELECT 'j-' || i, i FROM generate_series(1, 4) i;
UPDATE store.goods SET stock = 0 WHERE sku LIKE 'h-%' AND stock < 3;
ROLLBACK TO f;
RELEASE f;
INSERT INTO store.goods VALUES ('k-1', 1);
SELECT count(*) AS seen_before_commit FROM orch.audit_log WHERE xid = :'tx';
COMMIT;
SELECT r.n_events, pg_catalog.array_agg(DISTINCT pg_catalog.left(l.new_row->>'sku', 2)) AS skus
  FROM orch.audit_records r JOIN orch.audit_log l USING (record_id)
 WHERE r.xid = :'tx' GROUP BY r.record_id, r.n_events ORDER BY r.record_id;
DELETE FROM store.goods WHERE sku ~ '^[hik]-';
-- A record's events are compressed in its row, with the column's method,
-- once they pass 256 bytes (PostgreSQL would compress them only in a row
-- past 2 kB): a claim's or a verdict's record, 0.5 to 1.3 kB, keeps a
-- half to three quarters.  Smaller ones, and all of them when the column's
-- storage says not to compress, are stored as they are.  They read back
-- the same.
CREATE FUNCTION pg_temp.record_stored(tx xid8)
	RETURNS TABLE (n_events int, long boolean, compression text, smaller boolean, skus text)
	LANGUAGE sql AS $$
SELECT r.n_events, pg_catalog.octet_length(r.events) > 256,
	   pg_catalog.pg_column_compression(r.events),
	   pg_catalog.pg_column_size(r.events) < pg_catalog.octet_length(r.events),
	   (SELECT pg_catalog.string_agg(l.new_row->>'sku', ' ' ORDER BY l.audit_id)
		  FROM orch.audit_log l WHERE l.record_id = r.record_id)
  FROM orch.audit_records r WHERE r.xid = tx ORDER BY r.record_id $$;
INSERT INTO store.goods VALUES ('m-1', 1) RETURNING pg_current_xact_id() AS tx \gset
SELECT * FROM pg_temp.record_stored(:'tx');
WITH i AS (INSERT INTO store.goods SELECT 'm-' || i, i FROM generate_series(2, 6) i RETURNING 1)
SELECT DISTINCT pg_current_xact_id() AS tx FROM i \gset
SELECT * FROM pg_temp.record_stored(:'tx');
ALTER TABLE orch.audit_records ALTER COLUMN events SET COMPRESSION pglz;
WITH i AS (INSERT INTO store.goods SELECT 'n-' || i, i FROM generate_series(1, 5) i RETURNING 1)
SELECT DISTINCT pg_current_xact_id() AS tx FROM i \gset
SELECT * FROM pg_temp.record_stored(:'tx');
ALTER TABLE orch.audit_records ALTER COLUMN events SET STORAGE EXTERNAL;
WITH i AS (INSERT INTO store.goods SELECT 'o-' || i, i FROM generate_series(1, 5) i RETURNING 1)
SELECT DISTINCT pg_current_xact_id() AS tx FROM i \gset
SELECT * FROM pg_temp.record_stored(:'tx');
ALTER TABLE orch.audit_records ALTER COLUMN events SET STORAGE EXTENDED,
	ALTER COLUMN events SET COMPRESSION lz4;
DELETE FROM store.goods WHERE sku ~ '^[mno]-';
-- A value whose rendering (a cast to json) changes an audited table: that
-- change is recorded in a record of its own, not in the middle of the
-- event being rendered.
CREATE TYPE store.span AS RANGE (subtype = int4);
CREATE FUNCTION store.span_json(s store.span) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO store.goods VALUES ('r-' || lower(s), 1);
	RETURN to_json(lower(s));
END $$;
CREATE CAST (store.span AS json) WITH FUNCTION store.span_json(store.span);
CREATE TABLE store.spans (id int PRIMARY KEY, s store.span);
SELECT orch.enable_audit('store.spans');
BEGIN;
SELECT pg_current_xact_id() AS tx \gset
INSERT INTO store.goods VALUES ('s-1', 1);
INSERT INTO store.spans VALUES (1, '[5,6)'), (2, '[7,8)');
COMMIT;
SELECT l.table_name, l.operation, l.new_row, r.n_events
  FROM orch.audit_log l JOIN orch.audit_records r USING (record_id)
 WHERE l.xid = :'tx' ORDER BY l.record_id, l.audit_id;
SELECT orch.disable_audit('store.spans');
DROP TABLE store.spans;
DROP CAST (store.span AS json);
DELETE FROM store.goods WHERE sku ~ '^[rs]-';
-- A statement of a savepoint rolled back takes its events out of the
-- transaction's record and its own records with it.
BEGIN;
SELECT pg_current_xact_id() AS tx \gset
INSERT INTO store.goods SELECT 'm-' || i, i FROM generate_series(1, 998) i;
SAVEPOINT g;
INSERT INTO store.goods SELECT 'n-' || i, i FROM generate_series(1, 5) i;
ROLLBACK TO g;
INSERT INTO store.goods SELECT 'o-' || i, i FROM generate_series(1, 3) i;
COMMIT;
SELECT r.n_events, pg_catalog.array_agg(DISTINCT pg_catalog.left(l.new_row->>'sku', 2)) AS skus
  FROM orch.audit_records r JOIN orch.audit_log l USING (record_id)
 WHERE r.xid = :'tx' GROUP BY r.record_id, r.n_events ORDER BY r.record_id;
DELETE FROM store.goods WHERE sku ~ '^[mo]-';
-- The audit tables can be changed in a transaction that wrote records
-- (nothing of them is left open across a utility statement), and an index
-- added to orch.audit_records gets the records written after it.
BEGIN;
SELECT pg_current_xact_id() AS tx \gset
INSERT INTO store.goods SELECT 'p-' || i, i FROM generate_series(1, 1001) i;
CREATE INDEX audit_records_some ON orch.audit_records (xid) WHERE n_events BETWEEN 1 AND 1000;
INSERT INTO store.goods SELECT 'q-' || i, i FROM generate_series(1, 1001) i;
COMMIT;
PREPARE records_of(xid8) AS
	SELECT count(*) FROM orch.audit_records WHERE xid = $1 AND n_events BETWEEN 1 AND 1000;
SET plan_cache_mode = force_generic_plan;
SET enable_seqscan = off;
SET enable_bitmapscan = off;
EXPLAIN (COSTS OFF) EXECUTE records_of(:'tx');
EXECUTE records_of(:'tx');
DEALLOCATE records_of;
RESET plan_cache_mode;
SET enable_seqscan = on;
SET enable_indexscan = off;
SET enable_indexonlyscan = off;
SELECT count(*) AS records, sum(n_events) AS events
  FROM orch.audit_records WHERE xid = :'tx' AND n_events BETWEEN 1 AND 1000;
RESET enable_seqscan;
RESET enable_indexscan;
RESET enable_indexonlyscan;
RESET enable_bitmapscan;
DROP INDEX orch.audit_records_some;
DELETE FROM store.goods WHERE sku ~ '^[pq]-';

-- A record's stored fields read back: each statement's who, when and why,
-- each event's row images as jsonb.  Bytes that are not what the trigger
-- writes (here a NUL inside a string) are refused, not read past.
SELECT audit_id, at, table_name, operation, actor, db_user, session_role, reason, row_key,
	   new_row, run_id, row_hash
  FROM orch._audit_unpack(7, 1, '\x01000000080000000000000000010000000178010000000149000100000001750100000001750000000001000001000000065300000001410000'::bytea, ''::bytea);
SELECT app.show_error($$SELECT * FROM orch._audit_unpack(7, 1, '\x0100000008000000000000000001000000017801000000014900010000000175010000000175000000000100000100000007530000000241000000'::bytea, '')$$);
SELECT app.show_error($$SELECT * FROM orch._audit_unpack(7, 2, '\x01000000080000000000000000010000000178010000000149000100000001750100000001750000000001000001000000065300000001410000'::bytea, '')$$);
-- A timestamptz column's value is stored as its microseconds (D) and a
-- uuid column's as its 16 bytes (U), and read back as to_jsonb writes them
-- (in UTC); one outside the years 1 to 9999, or cut short, is not canonical.
SELECT new_row FROM orch._audit_unpack(7, 1, '\x010000000800000000000000000100000001780100000001490001000000017501000000017500000000010000010000000944000661c46c950e000000'::bytea, '')
UNION ALL
SELECT new_row FROM orch._audit_unpack(7, 1, '\x0100000008000000000000000001000000017801000000014900010000000175010000000175000000000100000100000011550189c7a0e8d47b3e8f2a4c1d9e0b5a670000'::bytea, '');
SELECT app.show_error($$SELECT * FROM orch._audit_unpack(7, 1, '\x01000000080000000000000000010000000178010000000149000100000001750100000001750000000001000001000000094480000000000000000000'::bytea, '')$$);
SELECT app.show_error($$SELECT * FROM orch._audit_unpack(7, 1, '\x010000000800000000000000000100000001780100000001490001000000017501000000017500000000010000010000000544000000000000'::bytea, '')$$);
-- a number with more digits than a numeric holds (131,072 before the point)
SELECT app.show_error(format($f$SELECT * FROM orch._audit_unpack(7, 1, %L::bytea, '')$f$,
	   replace('\x010000000800000000000000000100000001780100000001490001000000017501000000017500000000010000010000000944000661c46c950e000000',
			   '0000000944000661c46c950e00',
			   lpad(to_hex(5 + n), 8, '0') || '4e' || lpad(to_hex(n), 8, '0') || repeat('31', n))))
  FROM (VALUES (131072), (131073)) v(n);
-- a statement with no events, and a table name with a NUL
SELECT app.show_error($$SELECT * FROM orch._audit_unpack(7, 1, '\x01000000080000000000000000010000000178010000000149000100000001750100000001750000000000000001000000065300000001410000'::bytea, '')$$);
SELECT app.show_error($$SELECT * FROM orch._audit_unpack(7, 1, '\x0100000008000000000000000001000000020078010000000149000100000001750100000001750000000001000001000000065300000001410000'::bytea, '')$$);

-- The audit tables are append-only, for their owner and superusers too.
SELECT app.show_error($$UPDATE orch.audit_records SET purge = true$$);
SELECT app.show_error($$DELETE FROM orch.audit_records$$);
SELECT app.show_error($$TRUNCATE orch.audit_records$$);
SELECT app.show_error($$DELETE FROM orch.audit_blocks$$);
SET session_replication_role = replica;
SELECT app.show_error($$DELETE FROM orch.audit_records$$);
RESET session_replication_role;
-- orch.audit_log, one row per event, is a view of them.
SELECT app.show_error($$DELETE FROM orch.audit_log$$);
-- Nobody but the trigger writes to them.
SET ROLE audit_stranger;
SELECT app.show_error($$INSERT INTO orch.audit_records (xid, at, n_events, events, hashes)
						VALUES ('1', now(), 0, '', '')$$);
RESET ROLE;

-- Sealing takes every row of the transactions that have ended; the chain
-- then verifies, and so does the run.
SELECT orch.seal_audit() >= 0 AS sealed;
SELECT last_block >= 1 AS has_blocks, unsealed_rows, seal_lag FROM orch.audit_seal_status;
SELECT count(*) AS findings FROM orch.verify_audit();
SELECT count(*) AS findings FROM orch.verify_run(:'credit_run');
-- Each block's Merkle root, as docs/audit.md defines it: RFC 6962 over
-- its rows, whose leaf hashes are their row_hash values.
CREATE FUNCTION app.merkle(h bytea[]) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
	SELECT CASE coalesce(cardinality(h), 0)
		WHEN 0 THEN sha256(''::bytea)
		WHEN 1 THEN h[1]
		ELSE (SELECT sha256('\x01'::bytea || app.merkle(h[1:k]) || app.merkle(h[k + 1:]))
				FROM (SELECT (2 ^ floor(log(2.0, cardinality(h) - 1)))::int AS k) s)
	END
$$;
SELECT count(*) > 0 AS blocks,
	   count(*) FILTER (WHERE b.merkle_root <> app.merkle(array(
			SELECT l.row_hash FROM orch.audit_log l
			 WHERE l.xid >= b.xid_from AND l.xid < b.xid_to ORDER BY l.xid, l.audit_id))) AS other_roots,
	   count(*) FILTER (WHERE b.n_rows > 2) > 0 AS with_inner_nodes
  FROM orch.audit_blocks b;
SELECT array(SELECT jsonb_object_keys(orch.audit_digest()) ORDER BY 1) AS digest_keys;
SELECT count(*) AS findings FROM orch.verify_audit(orch.audit_digest());
-- With nothing to seal, a heartbeat asked for is an empty block.
SELECT orch.seal_audit(heartbeat => true) AS sealed_rows;
SELECT n_rows, xid_from = xid_to AS covers_nothing
  FROM orch.audit_blocks ORDER BY block_id DESC LIMIT 1;
SELECT app.show_error($$SELECT count(*) FROM orch.verify_audit('{"block_id": 1}')$$);
-- A block number is 1 or more, digits alone; a hash, 64 hexadecimal digits.
SELECT label, left(app.show_error(format('SELECT count(*) FROM orch.verify_audit(%L)', d)), 5) AS sqlstate
  FROM (VALUES ('block_id 1e30', '{"block_id": 1e30, "block_hash": "' || repeat('ab', 32) || '"}'),
			   ('block_id 1.5', '{"block_id": 1.5, "block_hash": "' || repeat('ab', 32) || '"}'),
			   ('block_id 0', '{"block_id": 0, "block_hash": "' || repeat('ab', 32) || '"}'),
			   ('block_id -3', '{"block_id": -3, "block_hash": "' || repeat('ab', 32) || '"}'),
			   ('hash starting -1', '{"block_id": 1, "block_hash": "-1' || repeat('ab', 31) || '"}'),
			   ('hash starting " f"', '{"block_id": 1, "block_hash": " f' || repeat('ab', 31) || '"}'),
			   ('hash starting +f', '{"block_id": 1, "block_hash": "+f' || repeat('ab', 31) || '"}')) v(label, d);

-- The BI view: one row per event, the block that sealed it.
SELECT operation, changed_columns, actor, block_id IS NOT NULL AS sealed
  FROM orch.audit_events
 WHERE table_name = 'app.accounts' ORDER BY xid, audit_id;

-- A purge removes whole sealed ranges, keeps their blocks, and is recorded;
-- the chain still verifies.
SELECT orch.purge_audit(now() + interval '1 minute') > 0 AS purged;
SELECT operation, new_row ? 'purged_through_block' AS says_how_far
  FROM orch.audit_log WHERE table_name = 'orch.audit_log';
SELECT count(*) AS rows_left_in_purged_blocks
  FROM orch.audit_log l
 WHERE l.xid < (SELECT b.xid_to FROM orch.audit_blocks b
				 WHERE b.block_id = (SELECT (p.new_row->>'purged_through_block')::bigint
									   FROM orch.audit_log p WHERE p.operation = 'PURGE'));
SELECT orch.seal_audit() >= 0 AS sealed;
SELECT block_id IS NOT NULL AS purge_sealed FROM orch.audit_events WHERE operation = 'PURGE';
SELECT count(*) AS findings FROM orch.verify_audit();

SELECT orch.disable_audit('app.accounts');
SELECT orch.disable_audit('app.no_key');
DROP ROLE audit_stranger;

-- Timestamps, enums and uuids are rendered as to_jsonb renders them in UTC,
-- whatever the session's settings: fractions without trailing zeros, the
-- years to_jsonb writes differently, infinities; an enum label renamed or
-- added after the table was first audited.
CREATE TYPE app.mood AS ENUM ('calm', 'busy');
CREATE DOMAIN app.mood_d AS app.mood;
CREATE DOMAIN app.ref_d AS uuid;
CREATE TABLE app.moments (id int PRIMARY KEY, at timestamptz, mood app.mood, ref uuid,
						  mood_d app.mood_d, ref_d app.ref_d);
SELECT orch.enable_audit('app.moments');
SET TimeZone = 'Asia/Kathmandu';
SET DateStyle = 'German';
INSERT INTO app.moments VALUES
	(1, '2026-01-02 03:04:05+00', 'calm', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'),
	(2, '2026-01-02 03:04:05.1+00', 'busy', '00000000-0000-0000-0000-000000000000'),
	(3, '2026-01-02 03:04:05.000001+00', NULL, 'ffffffff-ffff-ffff-ffff-ffffffffffff'),
	(4, '2026-01-02 03:04:05.120000+00', 'calm', NULL),
	(5, '2000-02-29 23:59:59.999999+00', 'calm', NULL),
	(6, '0001-01-01 00:00:00+00', 'calm', NULL),
	(7, '9999-12-31 23:59:59.5+00', 'calm', NULL),
	(8, '0044-03-15 12:00:00+00 BC', 'calm', NULL),
	(9, '10000-01-01 00:00:00+00', 'calm', NULL),
	(10, 'infinity', 'calm', NULL),
	(11, '-infinity', 'calm', NULL),
	(12, '1969-12-31 23:59:59.75+00', 'busy', NULL);
UPDATE app.moments SET mood_d = mood, ref_d = ref WHERE id IN (1, 2, 3);
ALTER TYPE app.mood RENAME VALUE 'busy' TO 'hectic';
ALTER TYPE app.mood ADD VALUE 'sleepy';
UPDATE app.moments SET mood = 'sleepy' WHERE id = 1;
UPDATE app.moments SET at = at WHERE id = 2;	-- changes nothing: no column
UPDATE app.moments SET mood = 'calm' WHERE id = 12;	-- was 'busy', now called 'hectic'
RESET TimeZone;
RESET DateStyle;
SET TimeZone = 'UTC';
SELECT m.id, l.new_row->'at' AS rendered, l.new_row->'at' = to_jsonb(m.at) AS as_to_jsonb,
	   l.new_row->'mood' AS mood, l.new_row->'ref' AS ref,
	   l.new_row->'ref' = COALESCE(to_jsonb(m.ref), 'null') AS ref_as_to_jsonb
  FROM orch.audit_log l JOIN app.moments m ON m.id = (l.row_key->>'id')::int
 WHERE l.table_name = 'app.moments' AND l.operation = 'INSERT'
 ORDER BY m.id;
SELECT row_key, old_row, new_row
  FROM orch.audit_log
 WHERE table_name = 'app.moments' AND operation = 'UPDATE'
 ORDER BY xid, audit_id;
-- Timestamps rendered lately are kept by value (16 slots): values that
-- repeat, and values a multiple of 16 microseconds apart, which share a
-- slot, are each rendered as their own.
CREATE TABLE app.ticks (id int PRIMARY KEY, at timestamptz);
SELECT orch.enable_audit('app.ticks');
INSERT INTO app.ticks
SELECT g, '2026-01-02 03:04:05+00'::timestamptz + (g % 7) * interval '16 microseconds'
		  + (g / 50) * interval '1 second'
  FROM generate_series(1, 200) g;
SELECT count(*) AS events, count(DISTINCT t.at) AS distinct_times,
	   count(*) FILTER (WHERE l.new_row->'at' = to_jsonb(t.at)) AS as_to_jsonb
  FROM orch.audit_log l JOIN app.ticks t ON t.id = (l.row_key->>'id')::int
 WHERE l.table_name = 'app.ticks';
-- Columns of domains over an enum and a uuid, as to_jsonb renders them; an
-- enum's label as it was when the row changed ('busy', since renamed).
SELECT (l.row_key->>'id')::int AS id, l.new_row->'mood_d' AS mood_d,
	   to_jsonb(m.mood_d) AS mood_d_now, l.new_row->'ref_d' = to_jsonb(m.ref_d) AS ref_d_as_to_jsonb
  FROM orch.audit_log l JOIN app.moments m ON m.id = (l.row_key->>'id')::int
 WHERE l.table_name = 'app.moments' AND l.operation = 'UPDATE' AND l.new_row ? 'ref_d'
 ORDER BY 1;
RESET TimeZone;
SELECT orch.disable_audit('app.moments');
DROP TABLE app.moments;
-- Intervals are rendered as to_jsonb renders them with IntervalStyle
-- iso_8601, whatever the session's style.
CREATE TABLE app.spans (id int PRIMARY KEY, span interval);
SELECT orch.enable_audit('app.spans');
SET IntervalStyle = 'postgres_verbose';
INSERT INTO app.spans VALUES
	(1, '1 year 2 months 3 days 04:05:06.789'), (2, '-1 day +02:00'), (3, '0'),
	(4, '-178000000 years'), (5, '1 microsecond'), (6, '-00:00:00.000001'),
	(7, '3 days -4 hours'), (8, '2147483647 days 2562047788:00:54.775807'),
	(9, '-2147483647 months -2147483647 days -2562047788:00:54.775807'), (10, NULL);
SET IntervalStyle = 'iso_8601';
SELECT s.id, l.new_row->'span' AS rendered, l.new_row->'span' = COALESCE(to_jsonb(s.span), 'null') AS as_to_jsonb
  FROM orch.audit_log l JOIN app.spans s ON s.id = (l.row_key->>'id')::int
 WHERE l.table_name = 'app.spans'
 ORDER BY s.id;
RESET IntervalStyle;
SELECT orch.disable_audit('app.spans');
DROP TABLE app.spans;
DROP DOMAIN app.mood_d;
DROP DOMAIN app.ref_d;
DROP TYPE app.mood;
