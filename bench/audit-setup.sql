-- bench/audit-setup.sql: the databases of bench/audit besides "bench" (which
-- has the audit trail as installed).  Fed to psql on stdin, connected to the
-- database it sets up, after bench/setup.sql; psql variable "mode" is
-- "off" (the orchestrator's audit triggers disabled) or "naive" (disabled,
-- and a single hash chain in their place, every writer locking its head).
\set ON_ERROR_STOP 1

DO $$
DECLARE
	t text;
BEGIN
	FOREACH t IN ARRAY ARRAY['orch.workflows', 'orch.workflow_steps', 'orch.retry_policies',
							 'orch.queues', 'orch.circuits', 'orch.runs', 'orch.steps',
							 'orch.attempts', 'orch.events'] LOOP
		EXECUTE format('ALTER TABLE %s DISABLE TRIGGER orch_audit_insert,'
					   ' DISABLE TRIGGER orch_audit_update, DISABLE TRIGGER orch_audit_delete,'
					   ' DISABLE TRIGGER orch_audit_truncate', t);
	END LOOP;
END
$$;

\if :{?mode}
\else
\set mode off
\endif
SELECT :'mode' = 'naive' AS naive \gset
\if :naive
-- The naive design, for contrast: one chain, each row hashed with the hash
-- of the row before it, so every writer locks the chain's head.
CREATE TABLE bench.naive_chain (seq bigint PRIMARY KEY, table_name text, operation text,
								row_data jsonb, prev_hash bytea, row_hash bytea);
CREATE TABLE bench.naive_head (id int PRIMARY KEY, seq bigint NOT NULL, hash bytea NOT NULL);
INSERT INTO bench.naive_head VALUES (1, 0, '\x00');
CREATE FUNCTION bench.naive_audit() RETURNS trigger LANGUAGE plpgsql AS $f$
DECLARE
	h bench.naive_head;
	d jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
	rh bytea;
BEGIN
	SELECT * INTO h FROM bench.naive_head WHERE id = 1 FOR UPDATE;
	rh := sha256(h.hash || convert_to(TG_TABLE_NAME || TG_OP || d::text, 'UTF8'));
	INSERT INTO bench.naive_chain VALUES (h.seq + 1, TG_TABLE_NAME, TG_OP, d, h.hash, rh);
	UPDATE bench.naive_head SET seq = h.seq + 1, hash = rh WHERE id = 1;
	RETURN NULL;
END
$f$;
CREATE TRIGGER naive_audit AFTER INSERT OR UPDATE OR DELETE ON orch.runs
	FOR EACH ROW EXECUTE FUNCTION bench.naive_audit();
CREATE TRIGGER naive_audit AFTER INSERT OR UPDATE OR DELETE ON orch.steps
	FOR EACH ROW EXECUTE FUNCTION bench.naive_audit();
CREATE TRIGGER naive_audit AFTER INSERT OR UPDATE OR DELETE ON orch.attempts
	FOR EACH ROW EXECUTE FUNCTION bench.naive_audit();
\endif
