-- bench/tasks-setup.sql: what bench/tasks needs in the database "bench", after
-- bench/setup.sql.  Fed to psql on stdin.
\set ON_ERROR_STOP 1

-- t1: one task in queue q, for the throughput measurements.
SELECT orch.define_workflow('t1', '{
  "description": "bench/tasks: one external task",
  "steps": [{"name": "work", "kind": "task", "queue": "q"}]}');

-- lat1: one task in queue lat, for the claim latency.
SELECT orch.define_workflow('lat1', '{
  "description": "bench/tasks: one external task, for the claim latency",
  "steps": [{"name": "work", "kind": "task", "queue": "lat"}]}');

/*
 * Wait until n tasks wait in the queue, looking every 100 ms and committing
 * between looks (as bench.wait_all_finished does).  Raises when the count
 * has not moved for stall_secs, or after timeout_secs.  When it takes more
 * than 2 s, reports every 2 s what the steps and the engine workers are
 * doing, as NOTICEs.
 */
CREATE PROCEDURE bench.wait_tasks_queued(queue text, n bigint, stall_secs int, timeout_secs int)
	LANGUAGE plpgsql
AS $$
DECLARE
	t_start		timestamptz := clock_timestamp();
	t_moved		timestamptz := clock_timestamp();
	t_report	timestamptz := clock_timestamp();
	k			bigint;
	k_last		bigint := -1;
	steps		text;
	engines		text;
BEGIN
	LOOP
		SELECT count(*) INTO k FROM orch.steps s
		 WHERE s.queue = wait_tasks_queued.queue AND s.status = 'waiting';
		EXIT WHEN k >= n;
		IF clock_timestamp() - t_report > interval '2 s' THEN
			t_report := clock_timestamp();
			PERFORM pg_stat_clear_snapshot();
			SELECT string_agg(format('%s %s', status, c), ', ' ORDER BY status) INTO steps
			  FROM (SELECT status, count(*) AS c FROM orch.steps GROUP BY 1) x;
			SELECT string_agg(format('pid %s: %s steps done, last batch %s, %s%s',
									 w.pid, w.steps_done,
									 coalesce(round(extract(epoch FROM clock_timestamp() - w.last_batch_at) * 1000)
											  || ' ms ago', 'never'),
									 coalesce(a.state, '?'),
									 coalesce(' waiting on ' || a.wait_event_type || '/' || a.wait_event, '')),
							  '; ' ORDER BY w.pid) INTO engines
			  FROM orch.engine_workers w LEFT JOIN pg_stat_activity a ON a.pid = w.pid
			 WHERE w.database = current_database();
			RAISE NOTICE 'bench: after % s, % of % tasks queued; steps: %; engines: %',
				round(extract(epoch FROM clock_timestamp() - t_start)::numeric, 1), k, n,
				coalesce(steps, 'none'), coalesce(engines, 'none');
		END IF;
		IF k <> k_last THEN
			k_last := k;
			t_moved := clock_timestamp();
		ELSIF clock_timestamp() - t_moved > make_interval(secs => stall_secs) THEN
			RAISE EXCEPTION 'tasks stuck: % of % tasks of queue % queued, none for % s',
				k, n, queue, stall_secs;
		END IF;
		IF clock_timestamp() - t_start > make_interval(secs => timeout_secs) THEN
			RAISE EXCEPTION 'timed out after % s with % of % tasks of queue % queued',
				timeout_secs, k, n, queue;
		END IF;
		COMMIT;
		PERFORM pg_sleep(0.1);
	END LOOP;
END
$$;

/*
 * Wait until the session with this application_name sleeps in
 * orch.claim_tasks's wait (wait event type Extension), looking every
 * millisecond; false after timeout_secs.
 */
CREATE FUNCTION bench.wait_for_claimer(app text, timeout_secs float8) RETURNS boolean
	LANGUAGE plpgsql
AS $$
DECLARE
	t_end		timestamptz := clock_timestamp() + make_interval(secs => timeout_secs);
BEGIN
	LOOP
		PERFORM pg_stat_clear_snapshot();	-- else the first look is kept
		IF EXISTS (SELECT FROM pg_stat_activity
					WHERE application_name = app AND state = 'active'
					  AND wait_event_type = 'Extension') THEN
			RETURN true;
		END IF;
		IF clock_timestamp() > t_end THEN
			RETURN false;
		END IF;
		PERFORM pg_sleep(0.001);
	END LOOP;
END
$$;

-- One row per sample of the claim latency.
CREATE TABLE bench.task_latency (
	round		int,
	i			int,			-- < 1: warm-up, not measured
	run_id		uuid,
	start_xid	xid8,			-- the start_run transaction
	t_after_commit timestamptz,	-- clock_timestamp() of the statement after its COMMIT
	t_wait_start timestamptz,	-- statement_timestamp() of the waiting claim
	t_queued	timestamptz,	-- the task's started_at: start of the engine batch that queued it
	t_claimed	timestamptz,	-- clock_timestamp() when claim_tasks had returned
	claimed_run	uuid
);

-- An interval in milliseconds, for messages.
CREATE FUNCTION bench.ms(interval) RETURNS numeric
	LANGUAGE sql IMMUTABLE
AS $$ SELECT round(extract(epoch FROM $1) * 1000, 2) $$;
