-- External task workers: claim, heartbeat, complete, fail; leases and fencing.
\set SHOW_CONTEXT never

SELECT orch.define_workflow('crm_sync', '{"steps": [
  {"name": "prep", "kind": "sql", "function": "app.record"},
  {"name": "push", "kind": "task", "queue": "crm", "needs": ["prep"],
   "retry": {"max_attempts": 3, "initial_interval": "10ms", "non_retryable": ["permanent"]}},
  {"name": "done", "kind": "sql", "function": "app.record", "needs": ["push"]}]}');

-- A task step needs a queue.
SELECT app.show_error($$SELECT orch.define_workflow('noqueue', '{"steps": [{"name": "t", "kind": "task"}]}')$$);

-- A worker role reaches tasks only through the task functions.
CREATE ROLE crm_worker IN ROLE orch_worker;
SET ROLE crm_worker;
SELECT app.show_error('SELECT count(*) FROM orch.steps');

-- The engine queues the task once "prep" is done; a waiting claim is woken by
-- that commit.  The lease comes with a token, a stable idempotency key and a
-- W3C traceparent; the input is the run context.
RESET ROLE;
SELECT orch.start_run('crm_sync', '{"customer": 7}') AS run \gset
SET ROLE crm_worker;
SELECT token, attempt, idempotency_key AS first_key, traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-01$' AS w3c,
	   input->'input' AS input, input->'steps'->'prep'->'step' AS saw_prep,
	   lease_expires_at > now() AS leased
  FROM orch.claim_tasks('crm', 'worker-1', 1, '30s', wait => '10s') \gset
SELECT :attempt AS attempt, :'w3c' AS w3c, :'input' AS input, :'saw_prep' AS saw_prep, :'leased' AS leased;
SELECT :'first_key' = :'run' || '/push' AS key_names_run_and_step;
RESET ROLE;
SELECT name, status, worker FROM orch.steps WHERE run_id = :'run' ORDER BY step_id;
SET ROLE crm_worker;

-- Nothing else to claim; a second claim of the same task gets nothing.
SELECT count(*) FROM orch.claim_tasks('crm', 'worker-2', 5, '30s');

-- A heartbeat renews the lease and records progress.
SELECT orch.heartbeat_task(:'token', '{"pushed": 10}');

-- A transient failure: the task is queued again, and the next worker gets
-- the same idempotency key.
SELECT orch.fail_task(:'token', 'CRM answered 503', 'transient', 'retry later');
SELECT token AS token2, attempt, idempotency_key = :'first_key' AS same_key
  FROM orch.claim_tasks('crm', 'worker-2', 1, '30s', wait => '10s') \gset
SELECT :attempt AS attempt, :'same_key' AS same_key;

-- Fencing: the first token is dead, and its verdict changes nothing.
SELECT app.show_error(format('SELECT orch.complete_task(%L, %L)', :'token', '{"late": true}'));
SELECT orch.heartbeat_task(:'token');
-- A token names its step, but only the lease's own token is accepted: the
-- live one with a digit changed is refused, and changes nothing.
SELECT (CASE WHEN left(:'token2', 1) = '0' THEN '1' ELSE '0' END || substr(:'token2', 2)) AS forged \gset
SELECT app.show_error(format('SELECT orch.complete_task(%L, %L)', :'forged', '{"forged": true}'));
SELECT orch.heartbeat_task(:'forged');

-- The holder of the lease completes the task; the run goes on.
SELECT orch.complete_task(:'token2', '{"crm_id": 42}');
RESET ROLE;
SELECT orch._lease_step(:'token2') = step_id AS token_names_step, orch._lease_step(:'forged') = step_id AS forged_names_it_too,
	   orch._lease_step(gen_random_uuid()) AS random_uuid_names_none
  FROM orch.steps WHERE run_id = :'run' AND name = 'push';
SELECT orch.wait_run(:'run', '30s');
SELECT name, status, attempt, output, progress FROM orch.steps WHERE run_id = :'run' ORDER BY step_id;
SELECT a.attempt, a.worker, outcome, error_class, message, detail
  FROM orch.attempts a JOIN orch.steps s USING (step_id)
 WHERE s.run_id = :'run' AND s.name = 'push' ORDER BY a.attempt;

-- A permanent failure listed as non-retryable fails the run.
SELECT orch.start_run('crm_sync', '{"customer": 8}') AS run2 \gset
SET ROLE crm_worker;
SELECT token AS token3 FROM orch.claim_tasks('crm', 'worker-1', 1, '30s', wait => '10s') \gset
SELECT orch.fail_task(:'token3', 'customer 8 does not exist in the CRM', 'permanent');
RESET ROLE;
SELECT orch.wait_run(:'run2', '30s');
SELECT error->>'step' AS step, error->>'class' AS class, error->>'gave_up' AS gave_up
  FROM orch.runs WHERE run_id = :'run2';

-- A lease that expires: the worker may have done the work, so the outcome is
-- unknown and a human decides; the late verdict is refused.
SELECT orch.start_run('crm_sync', '{"customer": 9}') AS run3 \gset
SET ROLE crm_worker;
SELECT token AS token4 FROM orch.claim_tasks('crm', 'worker-3', 1, '100ms', wait => '10s') \gset
RESET ROLE;
SELECT app.await(format('SELECT status = %L FROM orch.runs WHERE run_id = %L', 'needs_human', :'run3'));
SELECT name, status, error->>'class' AS class FROM orch.steps WHERE run_id = :'run3' ORDER BY step_id;
SELECT outcome, error_class, message FROM orch.attempts a JOIN orch.steps s USING (step_id)
 WHERE s.run_id = :'run3' AND s.name = 'push';
SET ROLE crm_worker;
SELECT app.show_error(format('SELECT orch.complete_task(%L, %L)', :'token4', '{}'));
RESET ROLE;
-- After checking, an operator redrives it; a worker finishes it.
SELECT orch.retry_run(:'run3', 'the CRM has no record of it');
SET ROLE crm_worker;
SELECT orch.complete_task(token, '{"crm_id": 43}') FROM orch.claim_tasks('crm', 'worker-1', 1, '30s', wait => '10s');
RESET ROLE;
SELECT orch.wait_run(:'run3', '30s');

-- A step's timeout and heartbeat_timeout cap the lease a worker asks for.
SELECT orch.define_workflow('capped', '{"steps": [
  {"name": "t", "kind": "task", "queue": "capped", "timeout": "1h", "heartbeat_timeout": "5s"}]}');
SELECT orch.start_run('capped') AS capped_run \gset
SELECT lease_expires_at <= clock_timestamp() + interval '5s' AS capped_to_heartbeat_timeout
  FROM orch.claim_tasks('capped', 'worker-1', 1, '30 minutes', wait => '10s');

-- schedule_to_start: a task no worker claims in time fails its attempt
-- (transient) and follows its retry policy; here it gives up after two.
SELECT orch.define_workflow('unclaimed', '{"steps": [
  {"name": "t", "kind": "task", "queue": "nobody_listens", "schedule_to_start": "100ms",
   "retry": {"max_attempts": 2, "initial_interval": "10ms"}}]}');
SELECT orch.start_run('unclaimed') AS unclaimed_run \gset
SELECT orch.wait_run(:'unclaimed_run', '30s');
SELECT a.attempt, a.worker LIKE 'engine:%' AS by_engine, error_class, message
  FROM orch.attempts a WHERE a.run_id = :'unclaimed_run' ORDER BY a.attempt;
SELECT error->>'gave_up' AS gave_up FROM orch.runs WHERE run_id = :'unclaimed_run';

-- Priorities: the task of the run started with the higher priority is
-- claimed first.  A queue limit caps the tasks leased at once.
SELECT orch.define_workflow('ranked', '{"steps": [{"name": "t", "kind": "task", "queue": "ranked"}]}');
SELECT orch.start_run('ranked', '{"n": "low"}', priority => 1) AS low_run \gset
SELECT orch.start_run('ranked', '{"n": "high"}', priority => 9) AS high_run \gset
SELECT orch.start_run('ranked', '{"n": "mid"}', priority => 5) AS mid_run \gset
SELECT orch.define_queue('ranked', max_running => 2);
SELECT app.await($$SELECT count(*) = 3 FROM orch.steps WHERE queue = 'ranked' AND status = 'waiting'$$);
SELECT input->'input'->>'n' AS claimed FROM orch.claim_tasks('ranked', 'worker-1', 10, '30s');
SELECT name, waiting, running, max_running FROM orch.queue_status WHERE name = 'ranked';
-- At the limit, a claim gets nothing until a lease ends.
SELECT count(*) FROM orch.claim_tasks('ranked', 'worker-2', 10, '30s');
SELECT orch.complete_task(lease_token, '{}') FROM orch.steps WHERE run_id = :'high_run';
SELECT input->'input'->>'n' AS claimed FROM orch.claim_tasks('ranked', 'worker-2', 10, '30s');
SELECT app.show_error($$SELECT orch.define_queue('ranked', max_running => 0)$$);
-- A claim that may wait gets nothing at the limit, and returns when its wait
-- is over; once the limit is lifted, the next claim takes the task.
SELECT orch.start_run('ranked', '{"n": "late"}') AS late_run \gset
SELECT app.await($$SELECT count(*) = 1 FROM orch.steps WHERE queue = 'ranked' AND status = 'waiting'$$);
SELECT count(*), clock_timestamp() - statement_timestamp() >= interval '100ms' AS waited
  FROM orch.claim_tasks('ranked', 'worker-3', 10, '30s', wait => '200ms');
SELECT orch.define_queue('ranked', max_running => NULL);
SELECT input->'input'->>'n' AS claimed FROM orch.claim_tasks('ranked', 'worker-3', 10, '30s', wait => '10s');
SELECT name, waiting, running, max_running FROM orch.queue_status WHERE name = 'ranked';

-- Bad calls.
SELECT app.show_error($$SELECT count(*) FROM orch.claim_tasks('crm', 'w', 0)$$);
SELECT app.show_error($$SELECT count(*) FROM orch.claim_tasks('crm', '', 1)$$);
SELECT app.show_error($$SELECT count(*) FROM orch.claim_tasks('crm', 'w', 1, '-1s')$$);
SELECT app.show_error($$SELECT orch.fail_task(gen_random_uuid(), 'x', 'sometimes')$$);
SELECT app.show_error($$SELECT orch.complete_task(gen_random_uuid(), NULL)$$);
-- A verdict and a claim lock rows: not in a read-only transaction.
BEGIN READ ONLY;
SELECT app.show_error($$SELECT orch.complete_task(gen_random_uuid(), '{}')$$);
ROLLBACK;
BEGIN READ ONLY;
SELECT app.show_error($$SELECT count(*) FROM orch.claim_tasks('crm', 'w', 1)$$);
ROLLBACK;

DROP ROLE crm_worker;

-- Several verdicts at once: orch.complete_tasks.  A token that holds no
-- lease, or comes twice, is reported and changes nothing; the rest complete.
SELECT orch.define_workflow('bulk', '{"steps": [{"name": "item", "kind": "task", "queue": "bulk"}]}');
SELECT count(orch.start_run('bulk', jsonb_build_object('n', g))) FROM generate_series(1, 3) g;
SELECT app.await($$SELECT count(*) = 3 FROM orch.steps WHERE queue = 'bulk' AND status = 'waiting'$$);
CREATE TEMP TABLE bulk_claim AS SELECT * FROM orch.claim_tasks('bulk', 'bulk-worker', 10, '1 min');
SELECT count(*) FROM bulk_claim;
SELECT c.ord, c.completed, c.detail
  FROM orch.complete_tasks(
		 (SELECT array_agg(token ORDER BY run_id) FROM bulk_claim)
		   || '00000000-0000-0000-0000-000000000000'::uuid
		   || (SELECT min(token::text)::uuid FROM bulk_claim),
		 (SELECT array_agg(jsonb_build_object('n', input->'input'->'n') ORDER BY run_id) FROM bulk_claim)
		   || '{}'::jsonb || '{}'::jsonb) WITH ORDINALITY AS c(token, completed, detail, ord)
 ORDER BY c.ord;
SELECT count(*) FILTER (WHERE r.status = 'succeeded') AS succeeded,
	   count(*) FILTER (WHERE r.output->'item' = jsonb_build_object('n', r.input->'n')) AS with_their_output
  FROM orch.runs r WHERE r.workflow = 'bulk';
SELECT app.show_error($$SELECT count(*) FROM orch.complete_tasks(ARRAY[gen_random_uuid()], '{}')$$);
SELECT app.show_error($$SELECT count(*) FROM orch.complete_tasks(ARRAY[NULL::uuid], ARRAY['{}'::jsonb])$$);

-- While a queue has a backlog, a session's claims resume after the task it
-- claimed last.  A claim that finds nothing after that point looks from the
-- head of the queue, so a task queued again behind it (here a retry) is not
-- left behind.
SELECT orch.define_workflow('resumed', '{"steps": [{"name": "t", "kind": "task", "queue": "resumed",
  "retry": {"max_attempts": 2, "initial_interval": "10ms"}}]}');
SELECT count(orch.start_run('resumed', jsonb_build_object('n', g))) FROM generate_series(1, 3) g;
SELECT app.await($$SELECT count(*) = 3 FROM orch.steps WHERE queue = 'resumed' AND status = 'waiting'$$);
CREATE TEMP TABLE resumed_claims (n int, attempt int, token uuid);
INSERT INTO resumed_claims
SELECT (input->'input'->>'n')::int, attempt, token FROM orch.claim_tasks('resumed', 'w', 1, '1 min');
SELECT orch.fail_task(token, 'try again', 'transient') FROM resumed_claims;
SELECT app.await($$SELECT count(*) = 3 FROM orch.steps WHERE queue = 'resumed' AND status = 'waiting'$$);
INSERT INTO resumed_claims
SELECT (input->'input'->>'n')::int, attempt, token FROM orch.claim_tasks('resumed', 'w', 1, '1 min');
INSERT INTO resumed_claims
SELECT (input->'input'->>'n')::int, attempt, token FROM orch.claim_tasks('resumed', 'w', 1, '1 min');
INSERT INTO resumed_claims
SELECT (input->'input'->>'n')::int, attempt, token FROM orch.claim_tasks('resumed', 'w', 1, '1 min');
SELECT n, attempt FROM resumed_claims ORDER BY n, attempt;
SELECT count(*) AS left_over FROM orch.claim_tasks('resumed', 'w', 1, '1 min');

-- The tasks of a paused run wait in their queue unclaimed until it resumes.
SELECT orch.start_run('resumed', '{"n": 4}') AS held_run \gset
SELECT app.await(format($$SELECT status = 'waiting' FROM orch.steps WHERE run_id = %L$$, :'held_run'));
SELECT orch.pause_run(:'held_run', 'hold on');
SELECT count(*) AS claimed_while_paused FROM orch.claim_tasks('resumed', 'w', 1, '1 min');
-- A claim from a limited queue with room, whose only waiting task is the
-- paused run's, waits for its wait too (it does not return at once).
SELECT orch.define_queue('resumed', max_running => 100);
SELECT count(*), clock_timestamp() - statement_timestamp() >= interval '100ms' AS waited
  FROM orch.claim_tasks('resumed', 'w', 1, '1 min', wait => '200ms');
SELECT orch.define_queue('resumed', max_running => NULL);
SELECT orch.resume_run(:'held_run');
SELECT input->'input'->>'n' AS claimed_after_resume FROM orch.claim_tasks('resumed', 'w', 1, '1 min');

-- A worker's loop in one call: orch.complete_and_claim completes the task
-- the worker holds and claims the next ones, in one transaction.  A refused
-- verdict is an error, as in complete_task, and nothing is claimed then.
SELECT orch.define_workflow('looped', '{"steps": [{"name": "t", "kind": "task", "queue": "looped"}]}');
SELECT count(orch.start_run('looped', jsonb_build_object('n', g))) FROM generate_series(1, 4) g;
SELECT app.await($$SELECT count(*) = 4 FROM orch.steps WHERE queue = 'looped' AND status = 'waiting'$$);
SELECT token AS l1, input->'input'->>'n' AS n1 FROM orch.claim_tasks('looped', 'looper', 1, '1 min') \gset
SELECT token AS l2, input->'input'->>'n' AS n2, attempt, idempotency_key LIKE '%/t' AS keyed,
	   lease_expires_at > now() AS leased
  FROM orch.complete_and_claim(:'l1', '{"done": 1}', 'looped', 'looper') \gset
SELECT :'n1' AS first, :'n2' AS second, :attempt AS attempt, :'keyed' AS keyed, :'leased' AS leased;
SELECT r.input->>'n' AS n, s.status, s.output, a.worker, a.outcome
  FROM orch.steps s JOIN orch.runs r USING (run_id) LEFT JOIN orch.attempts a USING (step_id)
 WHERE s.queue = 'looped' AND s.status <> 'waiting' ORDER BY n;
SELECT app.show_error(format('SELECT count(*) FROM orch.complete_and_claim(%L, %L, %L, %L)',
							 :'l1', '{}', 'looped', 'looper'));
SELECT count(*) AS still_waiting FROM orch.steps WHERE queue = 'looped' AND status = 'waiting';
SELECT input->'input'->>'n' AS claimed
  FROM orch.complete_and_claim(:'l2', '{"done": 2}', 'looped', 'looper', max => 10, lease => '1 min')
 ORDER BY 1;
SELECT status, count(*) FROM orch.steps WHERE queue = 'looped' GROUP BY 1 ORDER BY 1;
SELECT app.show_error($$SELECT count(*) FROM orch.complete_and_claim(NULL, '{}', 'looped', 'looper')$$);
SELECT app.show_error($$SELECT count(*) FROM orch.complete_and_claim(gen_random_uuid(), NULL, 'looped', 'looper')$$);
SELECT app.show_error($$SELECT count(*) FROM orch.complete_and_claim(gen_random_uuid(), '{}', 'looped', 'looper', 0)$$);
SELECT app.show_error($$SELECT count(*) FROM orch.complete_and_claim(gen_random_uuid(), '{}', 'looped', '')$$);

-- A claim from the head of a queue sets the point where claims resume to
-- where it stopped, even behind the old point: the claims after it take the
-- tasks left behind (here two retries) before going on.
SELECT orch.define_workflow('behind', '{"steps": [{"name": "t", "kind": "task", "queue": "behind",
  "retry": {"max_attempts": 2, "initial_interval": "10ms"}}]}');
SELECT count(orch.start_run('behind', jsonb_build_object('n', g))) FROM generate_series(1, 6) g;
SELECT app.await($$SELECT count(*) = 6 FROM orch.steps WHERE queue = 'behind' AND status = 'waiting'$$);
CREATE TEMP TABLE behind_claims (seq serial, n int, attempt int, token uuid);
INSERT INTO behind_claims (n, attempt, token)
SELECT (input->'input'->>'n')::int, attempt, token FROM orch.claim_tasks('behind', 'w', 2, '1 min');
INSERT INTO behind_claims (n, attempt, token)
SELECT (input->'input'->>'n')::int, attempt, token FROM orch.claim_tasks('behind', 'w', 2, '1 min');
SELECT count(orch.fail_task(token, 'try again', 'transient')) FROM behind_claims WHERE n <= 2;
SELECT app.await($$SELECT count(*) = 4 FROM orch.steps WHERE queue = 'behind' AND status = 'waiting'$$);
SELECT pg_sleep(0.15);
INSERT INTO behind_claims (n, attempt, token)
SELECT (input->'input'->>'n')::int, attempt, token FROM orch.claim_tasks('behind', 'w', 1, '1 min');
INSERT INTO behind_claims (n, attempt, token)
SELECT (input->'input'->>'n')::int, attempt, token FROM orch.claim_tasks('behind', 'w', 1, '1 min');
INSERT INTO behind_claims (n, attempt, token)
SELECT (input->'input'->>'n')::int, attempt, token FROM orch.claim_tasks('behind', 'w', 1, '1 min');
SELECT n, attempt FROM behind_claims ORDER BY seq;

-- The run context a task is handed, in full: the run, the step and its
-- attempt, the run's input and business key, the outputs of the steps done,
-- and the error when the run was routed to the task by one.
CREATE FUNCTION app.refuse(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	RAISE EXCEPTION 'out of stock' USING ERRCODE = '23514';
END
$$;
SELECT orch.define_workflow('picking', '{"steps": [
  {"name": "reserve", "kind": "sql", "function": "app.record"},
  {"name": "pick", "kind": "sql", "function": "app.refuse", "needs": ["reserve"],
   "retry": {"max_attempts": 1}, "on_error": [{"errors": ["permanent"], "goto": "by_hand"}]},
  {"name": "by_hand", "kind": "task", "queue": "picking"}]}');
SELECT orch.start_run('picking', '{"order": 9, "lines": [1, 2.50, null, "x"]}',
					  business_key => 'order-9') AS picking_run \gset
SELECT input->>'run_id' = :'picking_run' AS its_run, jsonb_pretty(input - 'run_id') AS context
  FROM orch.claim_tasks('picking', 'picker', 1, '1 min', wait => '10s');

-- A claim reads its queue's index, and a verdict its task's rows through
-- the indexes of their keys, which they look up once per session: an index
-- built anew (a new OID) in the same session is found.
SELECT orch.define_workflow('rebuilt', '{"steps": [{"name": "t", "kind": "task", "queue": "rebuilt"}]}');
SELECT count(orch.start_run('rebuilt')) FROM generate_series(1, 3);
SELECT app.await($$SELECT count(*) = 3 FROM orch.steps WHERE queue = 'rebuilt' AND status = 'waiting'$$);
SELECT orch.complete_task(token, '{"n": 1}') FROM orch.claim_tasks('rebuilt', 'w', 1, '1 min');
SELECT 'orch.steps_pkey'::regclass::oid AS steps_pkey_before \gset
REINDEX INDEX CONCURRENTLY orch.steps_pkey;
SELECT 'orch.steps_pkey'::regclass::oid <> :steps_pkey_before AS steps_pkey_rebuilt;
SELECT orch.complete_task(token, '{"n": 2}') FROM orch.claim_tasks('rebuilt', 'w', 1, '1 min');
BEGIN;
DROP INDEX orch.steps_task_queue;
CREATE INDEX steps_task_queue ON orch.steps (queue, (- priority::bigint), step_id)
	WITH (fillfactor = 10) WHERE status = 'waiting' AND queue IS NOT NULL;
COMMIT;
SELECT orch.complete_task(token, '{"n": 3}') FROM orch.claim_tasks('rebuilt', 'w', 1, '1 min');
SELECT s.output, s.status, r.status AS run FROM orch.steps s JOIN orch.runs r USING (run_id)
 WHERE r.workflow = 'rebuilt' ORDER BY s.step_id;

-- A claim leases its tasks through orch.steps's access method, without an
-- UPDATE statement, where that statement would do no more than write the
-- rows, their index entries, their AFTER ROW triggers' events and their
-- audit events.  An AFTER ROW trigger of one's own fires either way; with
-- a BEFORE ROW trigger the UPDATE statement leases.  All lease alike and
-- record the same audit event.
SELECT orch.define_workflow('leased', '{"steps": [{"name": "t", "kind": "task", "queue": "leased", "timeout": "2 min"}]}');
SELECT count(orch.start_run('leased', '{"n": 1}', business_key => 'bk')) FROM generate_series(1, 3);
SELECT app.await($$SELECT count(*) = 3 FROM orch.steps WHERE queue = 'leased' AND status = 'waiting'$$);
CREATE TABLE app.steps_seen (step_id bigint, status orch.step_status, seen text);
CREATE FUNCTION app.see_step() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO app.steps_seen VALUES (NEW.step_id, NEW.status, TG_WHEN);
	RETURN NEW;
END
$$;
CREATE TEMP TABLE claimed AS
SELECT '1 no trigger' AS path, * FROM orch.claim_tasks('leased', 'w', 1, '5 min');
CREATE TRIGGER see_step AFTER UPDATE ON orch.steps FOR EACH ROW EXECUTE FUNCTION app.see_step();
INSERT INTO claimed SELECT '2 after row trigger', * FROM orch.claim_tasks('leased', 'w', 1, '5 min');
DROP TRIGGER see_step ON orch.steps;
CREATE TRIGGER see_step BEFORE UPDATE ON orch.steps FOR EACH ROW EXECUTE FUNCTION app.see_step();
INSERT INTO claimed SELECT '3 before row trigger', * FROM orch.claim_tasks('leased', 'w', 1, '5 min');
DROP TRIGGER see_step ON orch.steps;
SELECT c.path, string_agg(x.seen, ', ') AS trigger_saw
  FROM claimed c JOIN orch.steps s ON s.lease_token = c.token
  LEFT JOIN app.steps_seen x ON x.step_id = s.step_id AND x.status = 'running'
 GROUP BY c.path ORDER BY c.path;
SELECT c.path, c.attempt, c.lease_expires_at - now() BETWEEN '1 min' AND '2 min' AS lease_capped_by_timeout,
	   c.idempotency_key = c.run_id || '/t' AS key_ok,
	   c.traceparent = '00-' || encode(r.trace_id, 'hex') || '-' || lpad(to_hex(s.step_id), 16, '0') || '-01' AS traceparent_ok,
	   c.input - 'run_id' AS context,
	   s.status, s.worker, s.lease = '2 min' AS lease_kept, s.wake_at = c.lease_expires_at AS wakes_at_expiry
  FROM claimed c JOIN orch.steps s ON s.lease_token = c.token JOIN orch.runs r ON r.run_id = s.run_id
 ORDER BY c.path;
SELECT c.path, e.table_name, e.operation, e.changed_columns, e.run_id = c.run_id AS its_run,
	   e.old_row->>'status' AS old_status, e.new_row->>'status' AS new_status,
	   e.new_row->>'worker' AS worker, e.new_row->>'lease_token' = c.token::text AS token
  FROM claimed c JOIN orch.steps s ON s.lease_token = c.token
  JOIN orch.audit_events e ON e.step_id = s.step_id AND e.table_name = 'orch.steps'
						  AND e.new_row->>'status' = 'running'
 ORDER BY c.path;
-- A verdict writes its step, its attempt and its run's counter the same
-- way: with a BEFORE ROW trigger on orch.attempts by the INSERT statement,
-- with an AFTER ROW trigger of one's own on orch.runs without it.
CREATE TABLE app.rows_seen (tbl text, seen text, run_id uuid);
CREATE FUNCTION app.see_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO app.rows_seen VALUES (TG_TABLE_NAME, TG_WHEN || ' ' || TG_OP, (to_jsonb(NEW)->>'run_id')::uuid);
	RETURN NEW;
END
$$;
SELECT orch.complete_task(token, '{"ok": 1}') FROM claimed WHERE path = '1 no trigger';
CREATE TRIGGER see_attempt BEFORE INSERT ON orch.attempts FOR EACH ROW EXECUTE FUNCTION app.see_row();
CREATE TRIGGER see_run AFTER UPDATE ON orch.runs FOR EACH ROW EXECUTE FUNCTION app.see_row();
SELECT orch.complete_task(token, '{"ok": 2}') FROM claimed WHERE path = '2 after row trigger';
DROP TRIGGER see_attempt ON orch.attempts;
DROP TRIGGER see_run ON orch.runs;
SELECT c.path, r.status, r.steps_left, r.output, r.finished_at IS NOT NULL AS finished,
	   a.outcome, a.worker, a.finished_at = r.finished_at AS attempt_ends_run,
	   (SELECT string_agg(x.tbl || ' ' || x.seen, ', ' ORDER BY x.tbl) FROM app.rows_seen x
		 WHERE x.run_id = c.run_id) AS triggers_saw
  FROM claimed c JOIN orch.runs r USING (run_id) JOIN orch.attempts a USING (run_id)
 WHERE c.path < '3'
 ORDER BY c.path;
-- the verdict's events
SELECT c.path, e.table_name, e.operation, e.changed_columns, e.new_row->>'status' AS new_status,
	   e.new_row->'output' AS output, e.step_id IS NOT NULL AS has_step
  FROM claimed c JOIN orch.audit_events e ON e.run_id = c.run_id
 WHERE c.path < '3'
   AND e.xid = (SELECT a.xid FROM orch.audit_events a
				 WHERE a.run_id = c.run_id AND a.table_name = 'orch.attempts')
 ORDER BY c.path, e.audit_id;
-- What writing a table's rows needs of its indexes and triggers (predicates,
-- expressions, WHEN conditions) is prepared once a session; an index
-- created and a trigger's condition replaced in the same session are
-- written and evaluated at once.  amcheck finds every row the new partial
-- index should hold in it.
CREATE EXTENSION amcheck;
SELECT orch.define_workflow('prepared', '{"steps": [{"name": "t", "kind": "task", "queue": "prepared"}]}');
SELECT count(orch.start_run('prepared')) FROM generate_series(1, 5);
SELECT app.await($$SELECT count(*) = 5 FROM orch.steps WHERE queue = 'prepared' AND status = 'waiting'$$);
SELECT count(*) FROM orch.claim_tasks('prepared', 'w0', 1, '5 min');
CREATE INDEX steps_prepared_running ON orch.steps (worker, lower(worker)) WHERE status = 'running' AND queue = 'prepared';
CREATE TRIGGER see_step AFTER UPDATE ON orch.steps FOR EACH ROW
	WHEN (NEW.worker = 'w1' AND OLD.status = 'waiting') EXECUTE FUNCTION app.see_step();
SELECT count(*) FROM orch.claim_tasks('prepared', 'w1', 1, '5 min');
SELECT count(*) FROM orch.claim_tasks('prepared', 'w2', 1, '5 min');
CREATE OR REPLACE TRIGGER see_step AFTER UPDATE ON orch.steps FOR EACH ROW
	WHEN (NEW.worker = 'w2' AND OLD.status = 'waiting') EXECUTE FUNCTION app.see_step();
SELECT count(*) FROM orch.claim_tasks('prepared', 'w1', 1, '5 min');
SELECT count(*) FROM orch.claim_tasks('prepared', 'w2', 1, '5 min');
DROP TRIGGER see_step ON orch.steps;
SELECT s.worker, count(*) AS triggered
  FROM app.steps_seen x JOIN orch.steps s USING (step_id)
 WHERE s.queue = 'prepared' GROUP BY s.worker ORDER BY s.worker;
SELECT bt_index_check('orch.steps_prepared_running', heapallindexed => true);
SET enable_seqscan = off;
SET enable_bitmapscan = off;
SELECT worker FROM orch.steps WHERE status = 'running' AND queue = 'prepared' AND worker > '' ORDER BY worker;
RESET enable_seqscan;
RESET enable_bitmapscan;
DROP INDEX orch.steps_prepared_running;
SELECT count(*) FROM orch.complete_tasks(ARRAY(SELECT lease_token FROM orch.steps WHERE queue = 'prepared'),
										 array_fill('{}'::jsonb, ARRAY[5])) WHERE completed;
DROP EXTENSION amcheck;
