-- Retry policies, error classes, unknown outcomes, schedule_to_close, redrive.
\set SHOW_CONTEXT never

-- A named policy is validated and completed with the defaults.
SELECT orch.define_retry_policy('api', '{"max_attempts": 5, "initial_interval": "10ms",
										 "non_retryable": ["permanent"]}');
SELECT name, definition, updated_by = current_user AS by_me FROM orch.retry_policies;

-- Invalid policies are refused with the JSON path; nothing is stored.
SELECT app.show_error($$SELECT orch.define_retry_policy('bad', '{"max_atempts": 2}')$$);
SELECT app.show_error($$SELECT orch.define_retry_policy('bad', '{"schedule_to_close": "soon"}')$$);
SELECT app.show_error($$SELECT orch.define_retry_policy('bad', '"api"')$$);
SELECT app.show_error($$SELECT orch.define_retry_policy('bad policy', '{}')$$);
SELECT count(*) FROM orch.retry_policies WHERE name LIKE 'bad%';

-- Switches the test flips to make steps fail or succeed.
CREATE TABLE app.switches (name text PRIMARY KEY, outcome text NOT NULL);
INSERT INTO app.switches VALUES ('charge', 'permanent'), ('call', 'unknown'), ('flap', 'transient');

-- A step that records its effect, then fails as its switch says: the class is
-- chosen with orchestrator's SQLSTATEs ORTRN, ORPRM and ORUNK.
CREATE FUNCTION app.switched(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
	how text := (SELECT outcome FROM app.switches WHERE name = ctx->>'step');
BEGIN
	INSERT INTO app.effects (run_id, step, attempt)
	VALUES ((ctx->>'run_id')::uuid, ctx->>'step', (ctx->>'attempt')::int);
	CASE how
		WHEN 'transient' THEN RAISE EXCEPTION 'gateway busy' USING ERRCODE = 'ORTRN';
		WHEN 'permanent' THEN RAISE EXCEPTION 'card declined' USING ERRCODE = 'ORPRM';
		WHEN 'unknown' THEN RAISE EXCEPTION 'gateway timed out after sending' USING ERRCODE = 'ORUNK';
		ELSE RETURN jsonb_build_object('done', ctx->'step');
	END CASE;
END
$$;

-- A workflow names the policy; its values are copied into the version.
SELECT orch.define_workflow('payment', '{"steps": [
  {"name": "prep",   "kind": "sql", "function": "app.record"},
  {"name": "charge", "kind": "sql", "function": "app.switched", "needs": ["prep"], "retry": "api"},
  {"name": "notify", "kind": "sql", "function": "app.record", "needs": ["charge"]}]}');
SELECT name, retry_policy, max_attempts, non_retryable FROM orch.workflow_steps
 WHERE workflow = 'payment' ORDER BY ordinal;

-- An unknown policy name is an error at its path.
SELECT app.show_error($$SELECT orch.define_workflow('nopolicy', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "retry": "apii"}]}')$$);

-- Changing the policy changes later definitions, not the version already defined.
SELECT orch.define_retry_policy('api', '{"max_attempts": 9}') ->> 'max_attempts' AS now_allows;
SELECT max_attempts FROM orch.workflow_steps WHERE workflow = 'payment' AND name = 'charge';
SELECT orch.define_retry_policy('api', '{"max_attempts": 5, "initial_interval": "10ms",
										 "non_retryable": ["permanent"]}') IS NOT NULL AS restored;

-- A permanent error listed as non-retryable fails the step at once.
SELECT orch.start_run('payment') AS pay_run \gset
SELECT orch.wait_run(:'pay_run', '30s');
SELECT error->>'step' AS step, error->>'class' AS class, error->>'sqlstate' AS sqlstate,
	   error->>'gave_up' AS gave_up
  FROM orch.runs WHERE run_id = :'pay_run';
SELECT name, status FROM orch.steps WHERE run_id = :'pay_run' ORDER BY step_id;

-- Redrive: the failed step runs again with a fresh budget, the step cancelled
-- by the failure waits for it again, and the completed step is not run again.
UPDATE app.switches SET outcome = 'ok' WHERE name = 'charge';
SELECT orch.retry_run(:'pay_run', 'card replaced');
SELECT orch.wait_run(:'pay_run', '30s');
SELECT name, status, attempt FROM orch.steps WHERE run_id = :'pay_run' ORDER BY step_id;
SELECT step, count(*) FROM app.effects WHERE run_id = :'pay_run' GROUP BY step ORDER BY step;
SELECT a.attempt, outcome, error_class FROM orch.attempts a JOIN orch.steps s USING (step_id)
 WHERE s.run_id = :'pay_run' AND s.name = 'charge' ORDER BY attempt;
-- Only failed runs (and those waiting for a human) can be redriven.
SELECT app.show_error(format('SELECT orch.retry_run(%L)', :'pay_run'));

-- An unknown outcome is never retried blindly: the step and the run wait for
-- a human, although the policy allows more attempts.
SELECT orch.define_workflow('call_api', '{"steps": [
  {"name": "call", "kind": "sql", "function": "app.switched", "retry": "api"},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["call"]}]}');
SELECT orch.start_run('call_api') AS call_run \gset
SELECT app.await(format('SELECT status = %L FROM orch.runs WHERE run_id = %L', 'needs_human', :'call_run'));
SELECT name, status, error->>'class' AS class, error->>'gave_up' AS gave_up
  FROM orch.steps WHERE run_id = :'call_run' ORDER BY step_id;
SELECT count(*) AS attempts FROM orch.attempts WHERE run_id = :'call_run';
-- Someone checked the other side and wants the call made again.
UPDATE app.switches SET outcome = 'ok' WHERE name = 'call';
SELECT orch.retry_run(:'call_run', 'checked with the provider: not applied');
SELECT orch.wait_run(:'call_run', '30s');
SELECT count(*) AS attempts FROM orch.attempts WHERE run_id = :'call_run' AND step_id =
	(SELECT step_id FROM orch.steps WHERE run_id = :'call_run' AND name = 'call');

-- schedule_to_close caps the time over all attempts: with unlimited attempts
-- 100 ms apart, the step gives up once the next attempt would start more
-- than 250 ms after the first: two or three attempts, never more (fewer if
-- the machine is slow, since the cap counts from the first attempt).
SELECT orch.define_workflow('flapping', '{"steps": [
  {"name": "flap", "kind": "sql", "function": "app.switched",
   "retry": {"max_attempts": 0, "initial_interval": "100ms", "backoff_coefficient": 1,
             "schedule_to_close": "250ms"}}]}');
SELECT orch.start_run('flapping') AS flap_run \gset
SELECT orch.wait_run(:'flap_run', '30s');
SELECT error->>'class' AS class, error->>'gave_up' AS gave_up FROM orch.runs WHERE run_id = :'flap_run';
SELECT count(*) BETWEEN 2 AND 3 AS attempts_within_schedule_to_close
  FROM orch.attempts WHERE run_id = :'flap_run';
