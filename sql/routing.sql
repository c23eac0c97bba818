-- Failure routing (on_error), verification of unknown outcomes (verify),
-- idempotent tasks, and compensation (sagas).
\set SHOW_CONTEXT never

-- How each step fails: app.act records its effect, then does what this says.
CREATE TABLE app.outcomes (step text PRIMARY KEY, outcome text NOT NULL);
CREATE FUNCTION app.act(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
	how text := (SELECT outcome FROM app.outcomes WHERE step = ctx->>'step');
BEGIN
	INSERT INTO app.effects (run_id, step, attempt)
	VALUES ((ctx->>'run_id')::uuid, ctx->>'step', (ctx->>'attempt')::int);
	CASE how
		WHEN 'transient' THEN RAISE EXCEPTION 'service busy' USING ERRCODE = 'ORTRN';
		WHEN 'permanent' THEN RAISE EXCEPTION 'request refused' USING ERRCODE = 'ORPRM';
		WHEN 'duplicate' THEN RAISE EXCEPTION 'order exists' USING ERRCODE = 'unique_violation';
		WHEN 'unknown_once' THEN
			IF (ctx->>'attempt')::int = 1 THEN
				RAISE EXCEPTION 'no answer after sending' USING ERRCODE = 'ORUNK';
			END IF;
		ELSE NULL;
	END CASE;
	RETURN jsonb_build_object('done', ctx->>'step', 'attempt', ctx->'attempt');
END
$$;

-- A step that on_error routes to: it finds the error in its context.
CREATE FUNCTION app.escalate(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	SELECT jsonb_build_object('escalated', ctx->'error'->>'step',
							  'because', ctx->'error'->>'message',
							  'class', ctx->'error'->>'class')
$$;

/*
 * 1. on_error.  refund's rules are tried in order: a duplicate order (SQLSTATE
 * 23505) goes to already_done, any other permanent error to escalate.  close
 * needs all three, so it runs after whichever path the run took; notify needs
 * refund only, so it runs only if refund succeeded.
 */
SELECT orch.define_workflow('payout', '{"steps": [
  {"name": "refund", "kind": "sql", "function": "app.act",
   "retry": {"max_attempts": 2, "initial_interval": "10ms", "non_retryable": ["permanent"]},
   "on_error": [{"errors": ["23505"], "goto": "already_done"},
				{"errors": ["permanent"], "goto": "escalate"}]},
  {"name": "already_done", "kind": "sql", "function": "app.record"},
  {"name": "escalate", "kind": "sql", "function": "app.escalate"},
  {"name": "notify", "kind": "sql", "function": "app.record", "needs": ["refund"]},
  {"name": "close", "kind": "sql", "function": "app.record",
   "needs": ["refund", "already_done", "escalate"]}]}');
-- The steps on_error goes to need the steps that route to them.
SELECT name, needs, routes, route_target FROM orch.workflow_steps
 WHERE workflow = 'payout' ORDER BY ordinal;

-- refund succeeds: the route targets are skipped, everything else runs.
SELECT orch.start_run('payout') AS r1 \gset
SELECT orch.wait_run(:'r1');
SELECT name, status, output->>'skipped' AS why FROM orch.steps WHERE run_id = :'r1' ORDER BY step_id;

-- A permanent error: refund fails, the run goes on at escalate, with the error.
INSERT INTO app.outcomes VALUES ('refund', 'permanent');
SELECT orch.start_run('payout') AS r2 \gset
SELECT orch.wait_run(:'r2');
SELECT name, status, attempt, error->>'routed_to' AS routed_to FROM orch.steps
 WHERE run_id = :'r2' ORDER BY step_id;
SELECT output->'escalate' AS escalate FROM orch.runs WHERE run_id = :'r2';

-- The first matching rule wins: a duplicate is permanent too, but goes to already_done.
UPDATE app.outcomes SET outcome = 'duplicate' WHERE step = 'refund';
SELECT orch.start_run('payout') AS r3 \gset
SELECT orch.wait_run(:'r3');
SELECT name, status, error->>'sqlstate' AS sqlstate, error->>'routed_to' AS routed_to
  FROM orch.steps WHERE run_id = :'r3' ORDER BY step_id;

-- No rule for transient errors: when its attempts run out, the run fails.
UPDATE app.outcomes SET outcome = 'transient' WHERE step = 'refund';
SELECT orch.start_run('payout') AS r4 \gset
SELECT orch.wait_run(:'r4');
SELECT error->>'step' AS step, error->>'class' AS class, error->>'gave_up' AS gave_up,
	   error ? 'routed_to' AS routed
  FROM orch.runs WHERE run_id = :'r4';

-- Redrive keeps the routed failure of r2 as it is; in r4 refund runs again.
SELECT app.show_error(format('SELECT orch.retry_run(%L)', :'r2'));
UPDATE app.outcomes SET outcome = 'ok' WHERE step = 'refund';
SELECT orch.retry_run(:'r4');
SELECT orch.wait_run(:'r4');
SELECT name, status FROM orch.steps WHERE run_id = :'r4' ORDER BY step_id;

-- Invalid rules are refused at their JSON path.
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "on_error": [{"goto": "b"}]}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "on_error": [{"goto": "a"}]}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record",
   "on_error": [{"errors": ["fatal"], "goto": "b"}]},
  {"name": "b", "kind": "sql", "function": "app.record"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "on_error": {"goto": "b"}},
  {"name": "b", "kind": "sql", "function": "app.record"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "on_error": [{"goto": "b", "then": "c"}]},
  {"name": "b", "kind": "sql", "function": "app.record"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "on_error": [{"goto": "b"}]},
  {"name": "c", "kind": "sql", "function": "app.record"},
  {"name": "b", "kind": "sql", "function": "app.record", "needs": ["c"]}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "on_error": [{"goto": "b"}]},
  {"name": "b", "kind": "sql", "function": "app.record", "on_error": [{"goto": "a"}]}]}')$$);

/*
 * 2. verify.  charge's outcome is unknown on its first attempt; check_charge
 * reads back what happened and answers as app.answers says.
 */
CREATE TABLE app.answers (answer jsonb);
CREATE TABLE app.verifications (run_id uuid, attempt int, error text);
CREATE FUNCTION app.check_charge(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
	a jsonb := (SELECT answer FROM app.answers);
BEGIN
	INSERT INTO app.verifications
	VALUES ((ctx->>'run_id')::uuid, (ctx->>'attempt')::int, ctx->'error'->>'message');
	IF a = '"raise"' THEN
		RAISE EXCEPTION 'ledger unreachable' USING ERRCODE = 'ORTRN';
	END IF;
	RETURN a;
END
$$;
INSERT INTO app.outcomes VALUES ('charge', 'unknown_once');
SELECT orch.define_workflow('charge', '{"steps": [
  {"name": "charge", "kind": "sql", "function": "app.act", "verify": "app.check_charge",
   "retry": {"max_attempts": 3, "initial_interval": "10ms"}},
  {"name": "receipt", "kind": "sql", "function": "app.record", "needs": ["charge"]}]}');

-- Not applied: the attempt is a transient failure, retried by the policy.
INSERT INTO app.answers VALUES ('{"applied": false}');
SELECT orch.start_run('charge') AS v1 \gset
SELECT orch.wait_run(:'v1');
SELECT a.attempt, a.kind, a.outcome, a.error_class, a.message
  FROM orch.attempts a JOIN orch.steps s USING (step_id)
 WHERE s.run_id = :'v1' AND s.name = 'charge' ORDER BY a.finished_at, a.kind;
SELECT attempt, error FROM app.verifications WHERE run_id = :'v1';
SELECT output FROM orch.steps WHERE run_id = :'v1' AND name = 'charge';

-- Applied: the step succeeded with the output the verification found; no
-- second attempt.
UPDATE app.answers SET answer = '{"applied": true, "output": {"charged": 42}}';
SELECT orch.start_run('charge') AS v2 \gset
SELECT orch.wait_run(:'v2');
SELECT a.attempt, a.kind, a.outcome FROM orch.attempts a JOIN orch.steps s USING (step_id)
 WHERE s.run_id = :'v2' AND s.name = 'charge' ORDER BY a.finished_at, a.kind;
SELECT output FROM orch.steps WHERE run_id = :'v2' AND name = 'charge';

-- Undecided: a human decides; redrive runs the step again.
UPDATE app.answers SET answer = '{"maybe": true}';
SELECT orch.start_run('charge') AS v3 \gset
SELECT app.await(format($$SELECT status = 'needs_human' FROM orch.runs WHERE run_id = %L$$, :'v3'));
SELECT status, phase, error->>'gave_up' AS gave_up FROM orch.steps WHERE run_id = :'v3' AND name = 'charge';
SELECT a.attempt, a.kind, a.outcome, a.error_class, a.message
  FROM orch.attempts a JOIN orch.steps s USING (step_id)
 WHERE s.run_id = :'v3' AND s.name = 'charge' ORDER BY a.finished_at, a.kind;
SELECT orch.retry_run(:'v3', 'checked the ledger by hand');
SELECT orch.wait_run(:'v3');

-- A verify function that fails: a human decides too.
UPDATE app.answers SET answer = '"raise"';
SELECT orch.start_run('charge') AS v4 \gset
SELECT app.await(format($$SELECT status = 'needs_human' FROM orch.runs WHERE run_id = %L$$, :'v4'));
SELECT status, error->>'gave_up' AS gave_up, error->>'message' AS message
  FROM orch.steps WHERE run_id = :'v4' AND name = 'charge';

-- verify needs a function fn(ctx jsonb) returns jsonb, and a kind that can fail.
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "verify": "app.nope"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "verify": "app.wrong_return"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sleep", "duration": "1s", "verify": "app.check_charge"}]}')$$);

/*
 * 3. Idempotent tasks: a lost lease is a transient failure, retried by the
 * policy, instead of an unknown outcome.
 */
SELECT orch.define_workflow('ship', '{"steps": [
  {"name": "ship", "kind": "task", "queue": "ship", "idempotent": true,
   "retry": {"max_attempts": 3, "initial_interval": "10ms"}}]}');
SELECT orch.start_run('ship') AS t1 \gset
SELECT app.await($$SELECT count(*) = 1 FROM orch.steps WHERE queue = 'ship' AND status = 'waiting'$$);
SELECT count(*) FROM orch.claim_tasks('ship', 'doomed-worker', 1, '50ms');
-- the worker vanishes; the engine notices the lease expire and queues the task again
SELECT app.await($$SELECT count(*) = 1 FROM orch.steps WHERE queue = 'ship' AND status = 'waiting' AND attempt = 1$$);
SELECT orch.complete_task(token, '{"tracking": "T1"}') FROM orch.claim_tasks('ship', 'w2', 1, '1 min');
SELECT orch.wait_run(:'t1');
SELECT a.attempt, a.worker, a.outcome, a.error_class, a.message
  FROM orch.attempts a WHERE a.run_id = :'t1' ORDER BY a.attempt;
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "task", "queue": "q", "idempotent": "yes"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "idempotent": true}]}')$$);

/*
 * 4. Compensation.  A trip books a flight and a hotel, then charges; each
 * booking has a compensate function.  When the run fails, is cancelled or
 * times out, the bookings are undone latest first, each as an attempt of
 * kind compensate, and wait_run returns once they are.
 */
CREATE TABLE app.undone (n serial, run_id uuid, step text, output jsonb, run_status text);
CREATE FUNCTION app.undo(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	IF (SELECT outcome FROM app.outcomes WHERE step = 'undo_' || (ctx->>'step')) = 'permanent' THEN
		RAISE EXCEPTION 'cannot cancel % booking', ctx->>'step' USING ERRCODE = 'ORPRM';
	END IF;
	INSERT INTO app.undone (run_id, step, output, run_status)
	VALUES ((ctx->>'run_id')::uuid, ctx->>'step', ctx->'output', ctx->>'run_status');
	RETURN '{}';
END
$$;
SELECT orch.define_workflow('trip', '{"steps": [
  {"name": "flight", "kind": "sql", "function": "app.act", "compensate": "app.undo"},
  {"name": "hotel", "kind": "sql", "function": "app.act", "compensate": "app.undo",
   "needs": ["flight"]},
  {"name": "pause", "kind": "sleep", "duration": "1h", "needs": ["hotel"],
   "when": "$.input.pause == true"},
  {"name": "charge_card", "kind": "sql", "function": "app.act", "needs": ["hotel", "pause"],
   "retry": {"max_attempts": 1}}]}');

-- The run fails: hotel is undone, then flight.
INSERT INTO app.outcomes VALUES ('charge_card', 'permanent');
SELECT orch.start_run('trip') AS c1 \gset
SELECT orch.wait_run(:'c1');
SELECT step, output->>'done' AS booked, run_status FROM app.undone WHERE run_id = :'c1' ORDER BY n;
SELECT name, status, compensations FROM orch.steps WHERE run_id = :'c1' ORDER BY step_id;
SELECT s.name, a.attempt, a.kind, a.outcome FROM orch.attempts a JOIN orch.steps s USING (step_id)
 WHERE a.run_id = :'c1' AND a.kind = 'compensate' ORDER BY a.finished_at;
-- What was undone cannot be redriven.
SELECT app.show_error(format('SELECT orch.retry_run(%L)', :'c1'));

-- Cancelled while it sleeps: the same, in the same order.
SELECT orch.start_run('trip', '{"pause": true}') AS c2 \gset
SELECT app.await(format($$SELECT status = 'waiting' FROM orch.steps WHERE run_id = %L AND name = 'pause'$$, :'c2'));
SELECT orch.cancel_run(:'c2', 'trip called off');
SELECT orch.wait_run(:'c2');
SELECT step, run_status FROM app.undone WHERE run_id = :'c2' ORDER BY n;

-- Past its deadline: timed out, then compensated.
SELECT orch.start_run('trip', '{"pause": true}', deadline => now() + interval '300ms') AS c3 \gset
SELECT orch.wait_run(:'c3');
SELECT step, run_status FROM app.undone WHERE run_id = :'c3' ORDER BY n;

-- A compensation that fails for good stops there: the hotel waits for a
-- human, and the flight is not undone before it.
INSERT INTO app.outcomes VALUES ('undo_hotel', 'permanent');
SELECT orch.start_run('trip') AS c4 \gset
SELECT orch.wait_run(:'c4');
SELECT name, status, phase, error->>'gave_up' AS gave_up, error->>'message' AS message
  FROM orch.steps WHERE run_id = :'c4' ORDER BY step_id;
SELECT count(*) AS undone FROM app.undone WHERE run_id = :'c4';
-- Once the cause is fixed, retry_run goes on with the compensation.
DELETE FROM app.outcomes WHERE step = 'undo_hotel';
SELECT orch.retry_run(:'c4', 'hotel cancelled by phone');
SELECT orch.wait_run(:'c4');
SELECT step FROM app.undone WHERE run_id = :'c4' ORDER BY n;
SELECT name, status, compensations FROM orch.steps WHERE run_id = :'c4' ORDER BY step_id;

SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "compensate": 7}]}')$$);

-- A run that fails cancels all its unfinished steps, a task leased to a
-- worker too: the worker's late verdict changes nothing.
SELECT orch.define_workflow('race', '{"steps": [
  {"name": "remote", "kind": "task", "queue": "race"},
  {"name": "local", "kind": "sql", "function": "app.act", "needs": ["gate"], "retry": {"max_attempts": 1}},
  {"name": "gate", "kind": "sleep", "duration": "200ms"}]}');
INSERT INTO app.outcomes VALUES ('local', 'permanent');
SELECT orch.start_run('race') AS f1 \gset
SELECT app.await($$SELECT count(*) = 1 FROM orch.steps WHERE queue = 'race' AND status = 'waiting'$$);
SELECT token AS late_token FROM orch.claim_tasks('race', 'slow-worker', 1, '1 min') \gset
SELECT orch.wait_run(:'f1');
SELECT name, status FROM orch.steps WHERE run_id = :'f1' ORDER BY step_id;
SELECT app.show_error(format($$SELECT orch.complete_task(%L, '{}')$$, :'late_token'));
