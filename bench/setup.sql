-- bench/setup.sql: what bench/run needs in the database "bench".  Fed to psql
-- on stdin (the postgres OS user need not be able to read this tree).
\set ON_ERROR_STOP 1

CREATE EXTENSION orchestrator;
CREATE SCHEMA bench;

-- The step function of every step: a trivial bit of work, no table access.
CREATE FUNCTION bench.noop(ctx jsonb) RETURNS jsonb
	LANGUAGE sql
AS $$ SELECT jsonb_build_object('n', 1) $$;

-- chain3: one -> two -> three, each a sql step calling bench.noop.
SELECT orch.define_workflow('chain3', '{
  "description": "bench/run: three trivial sql steps in a chain",
  "steps": [
    {"name": "one",   "kind": "sql", "function": "bench.noop"},
    {"name": "two",   "kind": "sql", "function": "bench.noop", "needs": ["one"]},
    {"name": "three", "kind": "sql", "function": "bench.noop", "needs": ["two"]}
  ]}');

/*
 * Wait until no run is left unfinished, looking every 100 ms.  A procedure
 * that commits between looks, so that it holds no snapshot (and so no xmin
 * horizon) for longer than one look and one 100 ms sleep: the engine's dead
 * rows stay prunable while we wait.  Raises when the count of unfinished
 * runs has not moved for stall_secs (runs stuck), or after timeout_secs.
 */
CREATE PROCEDURE bench.wait_all_finished(stall_secs int, timeout_secs int)
	LANGUAGE plpgsql
AS $$
DECLARE
	t_start		timestamptz := clock_timestamp();
	t_moved		timestamptz := clock_timestamp();
	n			bigint;
	n_last		bigint := -1;
BEGIN
	LOOP
		SELECT count(*) INTO n FROM orch.runs
		 WHERE status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out');
		EXIT WHEN n = 0;
		IF n <> n_last THEN
			n_last := n;
			t_moved := clock_timestamp();
		ELSIF clock_timestamp() - t_moved > make_interval(secs => stall_secs) THEN
			RAISE EXCEPTION 'runs stuck: % runs unfinished and none finished for % s', n, stall_secs;
		END IF;
		IF clock_timestamp() - t_start > make_interval(secs => timeout_secs) THEN
			RAISE EXCEPTION 'timed out after % s with % runs unfinished', timeout_secs, n;
		END IF;
		COMMIT;
		PERFORM pg_sleep(0.1);
	END LOOP;
END
$$;
