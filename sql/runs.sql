-- orch.start_run, cancel_run, pause_run, resume_run, wait_run.
\set SHOW_CONTEXT never

SELECT orch.define_workflow('chain', '{"steps": [
  {"name": "one",   "kind": "sql", "function": "app.record"},
  {"name": "two",   "kind": "sql", "function": "app.record", "needs": ["one"]},
  {"name": "three", "kind": "sql", "function": "app.record", "needs": ["two"]}]}');

-- A run is pinned to the workflow's current version, and its steps start ready or pending.
BEGIN;
SELECT orch.start_run('chain', '{"order": 42}', idempotency_key => 'order-42') AS run \gset
SELECT workflow, version, status, input, owner = current_user AS owned_by_caller,
	   length(trace_id) AS trace_id_bytes, steps_left
  FROM orch.runs WHERE run_id = :'run';
SELECT name, status, pending_needs FROM orch.steps WHERE run_id = :'run' ORDER BY step_id;
COMMIT;

-- Run ids are UUID version 7 (variant RFC 9562), in the order runs are started,
-- their first 48 bits the start time in Unix milliseconds.
BEGIN;
SELECT orch.start_run('chain') AS r1, orch.start_run('chain') AS r2 \gset
SELECT substr(:'r1', 15, 1) AS version, substr(:'r1', 20, 1) IN ('8', '9', 'a', 'b') AS rfc_variant,
	   :'r1'::uuid < :'r2'::uuid AS increasing,
	   abs(('x' || lpad(replace(substr(:'r1', 1, 13), '-', ''), 16, '0'))::bit(64)::bigint
		   - (extract(epoch FROM clock_timestamp()) * 1000)::bigint) < 60000 AS unix_ms_prefix;
ROLLBACK;

-- The same workflow and idempotency key return the same run, not a second one.
SELECT orch.start_run('chain', '{"order": 42}', idempotency_key => 'order-42') = :'run' AS same_run;
SELECT count(*) FROM orch.runs WHERE idempotency_key = 'order-42';

-- The same key with a different input is an error, and starts nothing.
SELECT app.show_error($$SELECT orch.start_run('chain', '{"order": 43}', idempotency_key => 'order-42')$$);
SELECT count(*) FROM orch.runs WHERE idempotency_key = 'order-42';

-- wait_run returns the final status.
SELECT orch.wait_run(:'run', '30s');
SELECT step, attempt FROM app.effects WHERE run_id = :'run' ORDER BY at;

-- An unknown workflow, an unknown run.
SELECT orch.start_run('no_such_workflow');
SELECT orch.wait_run('00000000-0000-0000-0000-000000000000', '1s');


-- wait_run gives up after its timeout and returns the status then.
BEGIN;
SELECT orch.start_run('chain', '{"order": 44}') AS paused_run \gset
SELECT orch.pause_run(:'paused_run', 'waiting for the customer');
COMMIT;
SELECT orch.wait_run(:'paused_run', '200ms');
-- A paused run advances no step.
SELECT name, status FROM orch.steps WHERE run_id = :'paused_run' ORDER BY step_id;
SELECT status, reason FROM orch.runs WHERE run_id = :'paused_run';
-- Pausing again is harmless; resuming what is not paused is an error.
SELECT orch.pause_run(:'paused_run');
SELECT orch.resume_run(:'paused_run', 'customer answered');
SELECT app.show_error(format('SELECT orch.resume_run(%L)', :'run'));
SELECT orch.wait_run(:'paused_run', '30s');
SELECT count(*) AS effects FROM app.effects WHERE run_id = :'paused_run';

-- A finished run cannot be paused.
SELECT app.show_error(format('SELECT orch.pause_run(%L)', :'paused_run'));

-- Cancelling a run cancels its unfinished steps; cancelling again says so and returns false.
BEGIN;
SELECT orch.start_run('chain', '{"order": 45}') AS cancelled_run \gset
SELECT orch.cancel_run(:'cancelled_run', 'customer withdrew');
COMMIT;
SET client_min_messages = warning;	-- the notice names the run
SELECT orch.cancel_run(:'cancelled_run');
RESET client_min_messages;
SELECT status, error, finished_at IS NOT NULL AS finished FROM orch.runs WHERE run_id = :'cancelled_run';
SELECT name, status FROM orch.steps WHERE run_id = :'cancelled_run' ORDER BY step_id;
SELECT orch.wait_run(:'cancelled_run');
SELECT count(*) AS effects FROM app.effects WHERE run_id = :'cancelled_run';

-- wait_run refuses to wait for a run its own transaction started: the engine
-- cannot see it before the commit.
SELECT app.show_error($$SELECT orch.wait_run(orch.start_run('chain'), '10s')$$);

-- wait_run refuses a snapshot that could never see the run finish.
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT orch.wait_run(:'run');
ROLLBACK;

-- Privileges: PUBLIC can neither call the API nor read the tables.
CREATE ROLE orch_test_nobody;
SET ROLE orch_test_nobody;
SELECT orch.start_run('chain');
SELECT count(*) FROM orch.runs;
RESET ROLE;

-- An operator starts runs and owns them; its steps run with its privileges.
CREATE ROLE orch_test_operator IN ROLE orch_operator;
GRANT INSERT ON app.effects TO orch_test_operator;
SET ROLE orch_test_operator;
SELECT orch.start_run('chain', '{"order": 46}') AS op_run \gset
SELECT orch.wait_run(:'op_run', '30s');
SELECT owner FROM orch.runs WHERE run_id = :'op_run';
-- an operator may not define workflows
SELECT orch.define_workflow('mine', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record"}]}');
RESET ROLE;

-- A run whose owner may not write the business table fails on that step.
REVOKE INSERT ON app.effects FROM orch_test_operator;
SET ROLE orch_test_operator;
SELECT orch.start_run('chain', '{"order": 47}') AS denied_run \gset
SELECT orch.wait_run(:'denied_run', '30s');
RESET ROLE;
SELECT error->>'step' AS step, error->>'sqlstate' AS sqlstate, error->>'message' AS message
  FROM orch.runs WHERE run_id = :'denied_run';

DROP OWNED BY orch_test_operator, orch_test_nobody;
DROP ROLE orch_test_operator, orch_test_nobody;
