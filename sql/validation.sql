-- Validation gates: input_schema, output_schema (orch.validate_json's JSON
-- Schema subset) and review_if.
\set SHOW_CONTEXT never

-- 1. orch.validate_json: every violation, with its JSON path.
SELECT * FROM orch.validate_json('{"order_id": 7, "amount": 25.5, "tags": ["a"]}', '{
  "type": "object", "required": ["order_id", "amount"],
  "properties": {"order_id": {"type": "integer", "minimum": 1},
                 "amount": {"type": "number", "maximum": 1000},
                 "tags": {"type": "array", "items": {"type": "string", "minLength": 1}}},
  "additionalProperties": false}');
SELECT * FROM orch.validate_json('{"order_id": 7.5, "amount": "25", "tags": ["a", "", 3], "note": "x",
                                   "odd key": 1}', '{
  "type": "object", "required": ["order_id", "amount", "currency"],
  "properties": {"order_id": {"type": "integer"},
                 "amount": {"type": ["number", "null"]},
                 "tags": {"type": "array", "items": {"type": "string", "minLength": 1}},
                 "note": {"type": "string", "maxLength": 0}},
  "additionalProperties": false}');
-- enum, pattern (a PostgreSQL regular expression, matched anywhere), bounds, lengths in characters
SELECT * FROM orch.validate_json('{"kind": "loan", "code": "ab-12", "n": 0, "name": "été"}', '{
  "properties": {"kind": {"enum": ["refund", "question"]},
                 "code": {"type": "string", "pattern": "^[A-Z]+-[0-9]+$"},
                 "n": {"minimum": 1, "maximum": 10},
                 "name": {"minLength": 3, "maxLength": 3}}}');
-- additionalProperties as a schema; nested objects; a scalar at the root
SELECT * FROM orch.validate_json('{"meta": {"a": 1, "b": "x"}}', '{
  "properties": {"meta": {"type": "object", "additionalProperties": {"type": "integer"}}}}');
SELECT * FROM orch.validate_json('"text"', '{"type": "object"}');
SELECT * FROM orch.validate_json('1.0', '{"type": "integer", "enum": [1, 2]}');
-- an invalid schema is an error naming where in it the problem is
SELECT app.show_error($$SELECT count(*) FROM orch.validate_json('{}', '{"type": "text"}')$$);
SELECT app.show_error($$SELECT count(*) FROM orch.validate_json('{}', '{"properties": {"a": {"format": "email"}}}')$$);
SELECT app.show_error($$SELECT count(*) FROM orch.validate_json('{}', '{"items": {"pattern": "("}}')$$);
SELECT app.show_error($$SELECT count(*) FROM orch.validate_json('{}', '{"minLength": -1}')$$);
SELECT app.show_error($$SELECT count(*) FROM orch.validate_json('{}', '[]')$$);

-- 2. Schemas and review_if are checked when the workflow is defined.
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record",
   "output_schema": {"properties": {"amount": {"type": "decimal"}}}}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "review_if": "$.confidence <"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "wait_event", "event": "go", "input_schema": {}}]}')$$);

-- 3. A sql step's input: checked before its function runs, which then does not.
CREATE FUNCTION app.scored(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO app.effects (run_id, step, attempt)
	VALUES ((ctx->>'run_id')::uuid, ctx->>'step', (ctx->>'attempt')::int);
	RETURN jsonb_build_object('confidence', (ctx->'input'->>'confidence')::numeric,
							  'label', ctx->'input'->'label');
END
$$;
SELECT orch.define_workflow('classify', '{"steps": [
  {"name": "score", "kind": "sql", "function": "app.scored",
   "input_schema": {"properties": {"input": {"required": ["confidence"],
                                             "properties": {"confidence": {"type": "number"}}}}},
   "output_schema": {"type": "object", "required": ["label"],
                     "properties": {"label": {"type": "string"}}},
   "review_if": "$.confidence < 0.8"},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["score"]}]}');
SELECT orch.start_run('classify', '{"label": "spam"}') AS v1 \gset
SELECT orch.wait_run(:'v1');
SELECT error->>'sqlstate' AS sqlstate, error->>'class' AS class, error->>'message' AS message,
	   error->>'gave_up' AS gave_up
  FROM orch.runs WHERE run_id = :'v1';
SELECT count(*) AS effects FROM app.effects WHERE run_id = :'v1';
SELECT attempt, outcome, sqlstate FROM orch.attempts WHERE run_id = :'v1';

-- 4. Its output: checked in the step's transaction, so the step's effect is undone with it.
SELECT orch.start_run('classify', '{"confidence": 0.9, "label": 42}') AS v2 \gset
SELECT orch.wait_run(:'v2');
SELECT error->>'message' AS message FROM orch.runs WHERE run_id = :'v2';
SELECT count(*) AS effects FROM app.effects WHERE run_id = :'v2';

-- 5. review_if: an output it matches waits for a person, who accepts it or not.
SELECT orch.start_run('classify', '{"confidence": 0.95, "label": "ham"}') AS v3 \gset
SELECT orch.wait_run(:'v3');
SELECT orch.start_run('classify', '{"confidence": 0.5, "label": "spam"}') AS v4 \gset
SELECT orch.wait_run(:'v4');
SELECT step, why, error->>'message' AS message, error->'held_output' AS held, actions
  FROM orch.human_queue WHERE run_id = :'v4';
-- what a person provides must match the output_schema too
SELECT app.hq_error(format('SELECT orch.resolve(%s, %L, %L)', step_id, 'provide_input', '{"label": 1}'))
  FROM orch.human_queue WHERE run_id = :'v4';
SELECT orch.resolve(step_id, 'accept', reason => 'it is spam') FROM orch.human_queue WHERE run_id = :'v4';
SELECT orch.wait_run(:'v4');
SELECT name, status, output FROM orch.steps WHERE run_id = :'v4' ORDER BY step_id;
-- accept is only for held outputs
INSERT INTO app.hq_outcomes VALUES ('pay', 'permanent');
SELECT orch.start_run('payment', '{"account": "A-12"}') AS v6 \gset
SELECT orch.wait_run(:'v6');
SELECT app.hq_error(format('SELECT orch.resolve(%s, %L)', step_id, 'accept'))
  FROM orch.human_queue WHERE run_id = :'v6';
SELECT orch.resolve(step_id, 'skip') FROM orch.human_queue WHERE run_id = :'v6';
DELETE FROM app.hq_outcomes WHERE step = 'pay';

-- 6. A validation failure is final, and on_error rules route it (SQLSTATE ORVAL).
SELECT orch.define_workflow('classify_human', '{"steps": [
  {"name": "score", "kind": "sql", "function": "app.scored",
   "output_schema": {"required": ["label"], "properties": {"label": {"type": "string"}}},
   "on_error": [{"errors": ["ORVAL"], "human": true}]}]}');
SELECT orch.start_run('classify_human', '{"confidence": 1, "label": null}') AS v7 \gset
SELECT orch.wait_run(:'v7');
SELECT step, why, error->>'message' AS message, attempt FROM orch.human_queue WHERE run_id = :'v7';
SELECT orch.resolve(step_id, 'provide_input', '{"label": "unknown"}') FROM orch.human_queue WHERE run_id = :'v7';
SELECT orch.wait_run(:'v7');

-- 7. A task's input when it is queued, its output with the worker's verdict.
SELECT orch.define_workflow('extract', '{"steps": [
  {"name": "ocr", "kind": "task", "queue": "val_ocr",
   "input_schema": {"properties": {"input": {"required": ["document"]}}},
   "output_schema": {"required": ["text"], "properties": {"text": {"type": "string"}}}}]}');
SELECT orch.start_run('extract', '{}') AS v8 \gset
SELECT orch.wait_run(:'v8');
SELECT error->>'message' AS message FROM orch.runs WHERE run_id = :'v8';
SELECT orch.start_run('extract', '{"document": "scan.pdf"}') AS v9 \gset
SELECT app.await($$SELECT count(*) = 1 FROM orch.steps WHERE queue = 'val_ocr' AND status = 'waiting'$$);
SELECT orch.complete_task(token, '{"text": null}') FROM orch.claim_tasks('val_ocr', 'w1', 1, '1 min');
SELECT orch.wait_run(:'v9');
SELECT error->>'message' AS message FROM orch.runs WHERE run_id = :'v9';

-- 8. A wait_event step's payload.
SELECT orch.define_workflow('signed', '{"steps": [
  {"name": "signature", "kind": "wait_event", "event": "signed",
   "output_schema": {"required": ["by"]}}]}');
SELECT orch.start_run('signed') AS v10 \gset
SELECT orch.send_event(:'v10', 'signed', '{"when": "today"}') > 0 AS sent;
SELECT orch.wait_run(:'v10');
SELECT error->>'message' AS message FROM orch.runs WHERE run_id = :'v10';
