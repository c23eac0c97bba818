-- Circuit breakers: open after consecutive failures, block steps without
-- burning attempts, let one probe through after the cooldown, close on success.
\set SHOW_CONTEXT never

SELECT orch.define_circuit('payments_api', threshold => 2, cooldown => '2s');
SELECT app.show_error($$SELECT orch.define_circuit('payments api')$$);
SELECT app.show_error($$SELECT orch.define_circuit('x', threshold => 0)$$);

-- The target's health, as a switch the test flips.
CREATE TABLE app.target (healthy boolean NOT NULL);
INSERT INTO app.target VALUES (false);
CREATE FUNCTION app.call_target(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO app.effects (run_id, step, attempt)
	VALUES ((ctx->>'run_id')::uuid, ctx->>'step', (ctx->>'attempt')::int);
	IF NOT (SELECT healthy FROM app.target) THEN
		RAISE EXCEPTION 'payments API unreachable' USING ERRCODE = 'ORTRN';
	END IF;
	RETURN '{"paid": true}';
END
$$;

SELECT orch.define_workflow('pay', '{"steps": [
  {"name": "pay", "kind": "sql", "function": "app.call_target", "circuit": "payments_api",
   "retry": {"max_attempts": 10, "initial_interval": "50ms", "backoff_coefficient": 1}}]}');
-- A circuit named by a workflow for the first time starts closed with defaults.
SELECT orch.define_workflow('refund', '{"steps": [
  {"name": "refund", "kind": "sql", "function": "app.call_target", "circuit": "refunds_api"}]}');
SELECT name, state, threshold, cooldown FROM orch.circuits ORDER BY name;
SELECT app.show_error($$SELECT orch.define_workflow('nap', '{"steps": [
  {"name": "nap", "kind": "sleep", "duration": "1s", "circuit": "payments_api"}]}')$$);

-- Two failures open the circuit; the run's step then waits, blocked.
SELECT orch.start_run('pay') AS run \gset
SELECT app.await(format('SELECT status = %L FROM orch.steps WHERE run_id = %L', 'blocked', :'run'));
SELECT name, state, failures, blocked_steps FROM orch.circuit_status WHERE name = 'payments_api';
SELECT status FROM orch.steps WHERE run_id = :'run';
-- While it is open, a new run's step does not call the target at all.
SELECT orch.start_run('pay') AS run2 \gset
SELECT app.await(format('SELECT status = %L FROM orch.steps WHERE run_id = %L', 'blocked', :'run2'));
SELECT status, attempt FROM orch.steps WHERE run_id = :'run2';
SELECT count(*) AS calls_of_second_run FROM app.effects WHERE run_id = :'run2';

-- The target recovers: after the cooldown one probe goes through, succeeds,
-- closes the circuit, and the blocked steps go on.
UPDATE app.target SET healthy = true;
SELECT orch.wait_run(:'run', '30s') AS first, orch.wait_run(:'run2', '30s') AS second;
SELECT name, state, failures, blocked_steps FROM orch.circuit_status WHERE name = 'payments_api';
-- The blocked waits burned no attempts: two failed calls, then one success each.
SELECT r.n AS run, count(*) FILTER (WHERE outcome = 'failed') AS failed,
	   count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded
  FROM (VALUES (1, :'run'::uuid), (2, :'run2'::uuid)) r(n, id)
  JOIN orch.attempts a ON a.run_id = r.id
 GROUP BY r.n ORDER BY r.n;
