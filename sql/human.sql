-- The human queue: on_error rules that send a step to a person,
-- orch.human_queue, and orch.resolve.
\set SHOW_CONTEXT never

-- How each step behaves: app.hq_act records its effect, then does what this says.
CREATE TABLE app.hq_outcomes (step text PRIMARY KEY, outcome text NOT NULL);
CREATE FUNCTION app.hq_act(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO app.effects (run_id, step, attempt)
	VALUES ((ctx->>'run_id')::uuid, ctx->>'step', (ctx->>'attempt')::int);
	CASE (SELECT outcome FROM app.hq_outcomes WHERE step = ctx->>'step')
		WHEN 'permanent' THEN RAISE EXCEPTION 'account % is frozen', ctx->'input'->>'account'
									USING ERRCODE = 'ORPRM', HINT = 'Ask the bank.';
		WHEN 'transient' THEN RAISE EXCEPTION 'bank busy' USING ERRCODE = 'ORTRN';
		ELSE NULL;
	END CASE;
	RETURN jsonb_build_object('step', ctx->'step', 'saw', ctx->'steps');
END
$$;
-- app.show_error, with step ids masked too.
CREATE FUNCTION app.hq_error(stmt text) RETURNS text LANGUAGE sql AS $$
	SELECT regexp_replace(app.show_error(stmt), 'step [0-9]+', 'step <id>', 'g')
$$;
CREATE FUNCTION app.hq_undo(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	IF (SELECT outcome FROM app.hq_outcomes WHERE step = 'undo_' || (ctx->>'step')) = 'permanent' THEN
		RAISE EXCEPTION 'cannot undo %', ctx->>'step' USING ERRCODE = 'ORPRM';
	END IF;
	INSERT INTO app.effects (run_id, step, attempt)
	VALUES ((ctx->>'run_id')::uuid, 'undo_' || (ctx->>'step'), (ctx->>'attempt')::int);
	RETURN '{}';
END
$$;

/*
 * 1. An on_error rule with "human": true sends a step that failed for good to
 * the human queue instead of failing its run.
 */
SELECT orch.define_workflow('payment', '{"steps": [
  {"name": "check", "kind": "sql", "function": "app.hq_act"},
  {"name": "pay", "kind": "sql", "function": "app.hq_act", "needs": ["check"],
   "retry": {"max_attempts": 2, "initial_interval": "10ms"},
   "on_error": [{"errors": ["permanent"], "human": true}]},
  {"name": "receipt", "kind": "sql", "function": "app.hq_act", "needs": ["pay"]}]}');
SELECT on_error, routes FROM orch.workflow_steps WHERE workflow = 'payment' AND name = 'pay';

-- Rules are validated: one destination, and "human" can only be true.
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "on_error": [{"human": true, "goto": "b"}]},
  {"name": "b", "kind": "sql", "function": "app.record"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "on_error": [{"human": "yes"}]}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "on_error": [{"errors": ["permanent"]}]}]}')$$);

INSERT INTO app.hq_outcomes VALUES ('pay', 'permanent');
SELECT orch.start_run('payment', '{"account": "A-7"}', business_key => 'INV-7') AS p1 \gset
SELECT app.await(format($$SELECT status = 'needs_human' FROM orch.runs WHERE run_id = %L$$, :'p1'));
SELECT name, status FROM orch.steps WHERE run_id = :'p1' ORDER BY step_id;

-- The queue shows why, the error, and what the person needs to decide.
SELECT step, kind, compensating, why, error->>'message' AS message, error->>'hint' AS hint,
	   attempt, since IS NOT NULL AS since, input, steps->'check'->>'step' AS check_output,
	   business_key, owner = current_user AS owner, actions
  FROM orch.human_queue WHERE run_id = :'p1';
SELECT step_id AS p1_pay FROM orch.human_queue WHERE run_id = :'p1' \gset

-- 2. What resolve refuses, and why; none of it changes the step.
SELECT app.hq_error(format('SELECT orch.resolve(%s, %L)', :p1_pay, 'approve'));
SELECT app.hq_error(format('SELECT orch.resolve(%s, NULL)', :p1_pay));
SELECT app.hq_error(format('SELECT orch.resolve(%s, %L)', :p1_pay, 'provide_input'));
SELECT app.hq_error(format('SELECT orch.resolve(%s, %L, %L)', :p1_pay, 'provide_input', 'null'));
SELECT app.hq_error('SELECT orch.resolve(-1, ''skip'')');
SELECT app.hq_error(format('SELECT orch.resolve(step_id, %L) FROM orch.steps WHERE run_id = %L AND name = %L',
							 'skip', :'p1', 'check'));
CREATE ROLE hq_clerk;
GRANT orch_reader TO hq_clerk;
SET ROLE hq_clerk;
SELECT count(*) FROM orch.human_queue WHERE run_id = :'p1';
SELECT app.hq_error(format('SELECT orch.resolve(%s, %L)', :p1_pay, 'skip'));
RESET ROLE;
SELECT status, resolution FROM orch.steps WHERE step_id = :p1_pay;

-- 3. provide_input: the step succeeds with the data as its output, the run goes on.
CREATE ROLE hq_operator;
GRANT orch_operator TO hq_operator;
SET ROLE hq_operator;
SELECT orch.resolve(:p1_pay, 'provide_input', '{"paid_by": "wire", "ref": "W-1"}', 'paid by hand');
RESET ROLE;
SELECT orch.wait_run(:'p1');
SELECT name, status, output->'saw'->'pay' AS receipt_saw FROM orch.steps WHERE run_id = :'p1' ORDER BY step_id;
SELECT output, resolution->>'action' AS action, resolution->>'by' AS by, resolution->>'reason' AS reason,
	   resolution->'data' AS data
  FROM orch.steps WHERE step_id = :p1_pay;
SELECT count(*) FROM orch.human_queue WHERE run_id = :'p1';
-- the decision is in the audit trail, by whom it was made
SELECT db_user, new_row->'resolution'->>'action' AS action
  FROM orch.audit_log
 WHERE table_name = 'orch.steps' AND operation = 'UPDATE' AND step_id = :p1_pay
   AND new_row ? 'resolution';
-- resolved once: a second decision is refused
SELECT app.hq_error(format('SELECT orch.resolve(%s, %L)', :p1_pay, 'skip'));

-- 4. skip: the step is skipped; a step that needs only it is skipped too.
SELECT orch.start_run('payment', '{"account": "A-8"}') AS p2 \gset
SELECT app.await(format($$SELECT status = 'needs_human' FROM orch.runs WHERE run_id = %L$$, :'p2'));
SELECT orch.resolve(step_id, 'skip', reason => 'customer withdrew') FROM orch.human_queue WHERE run_id = :'p2';
SELECT orch.wait_run(:'p2');
SELECT name, status FROM orch.steps WHERE run_id = :'p2' ORDER BY step_id;

-- 5. fail: the step fails, and so does its run, naming the person.
SELECT orch.start_run('payment', '{"account": "A-9"}') AS p3 \gset
SELECT app.await(format($$SELECT status = 'needs_human' FROM orch.runs WHERE run_id = %L$$, :'p3'));
SELECT orch.resolve(step_id, 'fail', reason => 'fraud suspected') FROM orch.human_queue WHERE run_id = :'p3';
SELECT orch.wait_run(:'p3');
SELECT name, status FROM orch.steps WHERE run_id = :'p3' ORDER BY step_id;
SELECT error->>'step' AS step, error->>'class' AS class,
	   replace(error->>'message', current_user, '<me>') AS message,
	   error->>'gave_up' AS gave_up
  FROM orch.runs WHERE run_id = :'p3';

-- 6. retry: the step runs again with a fresh attempt budget.
SELECT orch.start_run('payment', '{"account": "A-10"}') AS p4 \gset
SELECT app.await(format($$SELECT status = 'needs_human' FROM orch.runs WHERE run_id = %L$$, :'p4'));
DELETE FROM app.hq_outcomes WHERE step = 'pay';
SELECT orch.resolve(step_id, 'retry') FROM orch.human_queue WHERE run_id = :'p4';
SELECT orch.wait_run(:'p4');
SELECT step, attempt FROM app.effects WHERE run_id = :'p4' ORDER BY at;

-- 7. Two steps of one run wait for a person: the run goes on once both are resolved.
SELECT orch.define_workflow('pair', '{"steps": [
  {"name": "left", "kind": "sql", "function": "app.hq_act", "retry": {"max_attempts": 1},
   "on_error": [{"human": true}]},
  {"name": "right", "kind": "sql", "function": "app.hq_act", "retry": {"max_attempts": 1},
   "on_error": [{"human": true}]},
  {"name": "join", "kind": "sql", "function": "app.hq_act", "needs": ["left", "right"]}]}');
INSERT INTO app.hq_outcomes VALUES ('left', 'transient'), ('right', 'permanent');
SELECT orch.start_run('pair') AS p5 \gset
SELECT app.await(format($$SELECT count(*) = 2 FROM orch.human_queue WHERE run_id = %L$$, :'p5'));
SELECT step, why FROM orch.human_queue WHERE run_id = :'p5' ORDER BY step;
SELECT orch.resolve(step_id, 'provide_input', '{"side": "L"}') FROM orch.human_queue
 WHERE run_id = :'p5' AND step = 'left';
SELECT status FROM orch.runs WHERE run_id = :'p5';
SELECT orch.resolve(step_id, 'provide_input', '{"side": "R"}') FROM orch.human_queue
 WHERE run_id = :'p5' AND step = 'right';
SELECT orch.wait_run(:'p5');
SELECT output->'saw' AS join_saw FROM orch.steps WHERE run_id = :'p5' AND name = 'join';

-- 8. A compensation that stopped for a person: skip counts the step as undone
-- by hand, and the saga goes on with the step before it.
SELECT orch.define_workflow('booking', '{"steps": [
  {"name": "seat", "kind": "sql", "function": "app.hq_act", "compensate": "app.hq_undo"},
  {"name": "meal", "kind": "sql", "function": "app.hq_act", "compensate": "app.hq_undo",
   "needs": ["seat"]},
  {"name": "card", "kind": "sql", "function": "app.hq_act", "needs": ["meal"],
   "retry": {"max_attempts": 1}}]}');
INSERT INTO app.hq_outcomes VALUES ('card', 'permanent'), ('undo_meal', 'permanent');
SELECT orch.start_run('booking') AS p6 \gset
SELECT app.await(format($$SELECT count(*) = 1 FROM orch.human_queue WHERE run_id = %L$$, :'p6'));
SELECT step, compensating, why FROM orch.human_queue WHERE run_id = :'p6';
SELECT orch.resolve(step_id, 'skip', reason => 'meal cancelled by phone')
  FROM orch.human_queue WHERE run_id = :'p6';
SELECT orch.wait_run(:'p6');
SELECT name, status FROM orch.steps WHERE run_id = :'p6' ORDER BY step_id;
SELECT step FROM app.effects WHERE run_id = :'p6' AND step LIKE 'undo%' ORDER BY at;

-- 9. An unknown outcome lands in the queue too: a worker's task, then input by hand.
SELECT orch.define_workflow('labels', '{"steps": [
  {"name": "label", "kind": "task", "queue": "hq_ship"},
  {"name": "notify", "kind": "sql", "function": "app.hq_act", "needs": ["label"]}]}');
SELECT orch.start_run('labels') AS p7 \gset
SELECT app.await($$SELECT count(*) = 1 FROM orch.steps WHERE queue = 'hq_ship' AND status = 'waiting'$$);
SELECT orch.fail_task(token, 'carrier timed out after the request was sent', 'unknown_outcome')
  FROM orch.claim_tasks('hq_ship', 'w1', 1, '1 min');
SELECT app.await(format($$SELECT count(*) = 1 FROM orch.human_queue WHERE run_id = %L$$, :'p7'));
SELECT step, kind, why, error->>'class' AS class FROM orch.human_queue WHERE run_id = :'p7';
SELECT orch.resolve(step_id, 'provide_input', '{"tracking": "Z-1"}') FROM orch.human_queue
 WHERE run_id = :'p7';
SELECT orch.wait_run(:'p7');
SELECT output->'saw'->'label' AS notify_saw FROM orch.steps WHERE run_id = :'p7' AND name = 'notify';

DROP ROLE hq_clerk;
DROP ROLE hq_operator;
