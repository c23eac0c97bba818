-- Install the extension and the application functions the other tests use.
CREATE EXTENSION orchestrator;

-- The extension's roles exist and nest: admin > operator > reader.
SELECT r.rolname, ARRAY(SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid
						WHERE m.member = r.oid ORDER BY 1) AS member_of
  FROM pg_roles r WHERE r.rolname LIKE 'orch\_%' ORDER BY 1;

CREATE SCHEMA app;
GRANT USAGE ON SCHEMA app TO PUBLIC;

-- A business table that sql steps write to: the exactly-once witness.
CREATE TABLE app.effects (run_id uuid, step text, attempt int, at timestamptz DEFAULT clock_timestamp());

-- A step that records its effect and echoes what it saw.
CREATE FUNCTION app.record(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	INSERT INTO app.effects (run_id, step, attempt)
	VALUES ((ctx->>'run_id')::uuid, ctx->>'step', (ctx->>'attempt')::int);
	SELECT jsonb_build_object('step', ctx->'step', 'input', ctx->'input', 'saw', ctx->'steps')
$$;

-- Classifies a ticket from the run input.
CREATE FUNCTION app.classify(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	SELECT jsonb_build_object('kind', coalesce(ctx->'input'->>'kind', 'question'))
$$;

-- Fails until its third attempt.
CREATE FUNCTION app.flaky(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO app.effects (run_id, step, attempt)
	VALUES ((ctx->>'run_id')::uuid, ctx->>'step', (ctx->>'attempt')::int);
	IF (ctx->>'attempt')::int < 3 THEN
		RAISE EXCEPTION 'upstream not ready (attempt %)', ctx->>'attempt'
			USING ERRCODE = 'lock_not_available', DETAIL = 'The lock is held elsewhere.';
	END IF;
	RETURN jsonb_build_object('attempt', ctx->'attempt');
END
$$;

-- Always fails, with a detail and a hint.
CREATE FUNCTION app.broken(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO app.effects (run_id, step, attempt)
	VALUES ((ctx->>'run_id')::uuid, ctx->>'step', (ctx->>'attempt')::int);
	RAISE EXCEPTION 'refund of % rejected', ctx->'input'->>'amount'
		USING ERRCODE = 'check_violation', DETAIL = 'Amount exceeds the order total.',
			  HINT = 'Check the order.';
END
$$;

-- Takes longer than its step allows.
CREATE FUNCTION app.slow(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	SELECT pg_sleep(5); SELECT '{}'::jsonb
$$;

-- Functions that cannot be steps.
CREATE FUNCTION app.wrong_return(ctx jsonb) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$;
CREATE FUNCTION app.wrong_args(a int) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
CREATE FUNCTION app.returns_null(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT NULL::jsonb $$;

-- Runs a statement; returns its first value, or its error (SQLSTATE, message,
-- detail, hint) with run ids masked so that the output is stable.
CREATE FUNCTION app.show_error(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	result text; st text; msg text; det text; hin text;
BEGIN
	EXECUTE stmt INTO result;
	RETURN result;
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL,
							hin = PG_EXCEPTION_HINT;
	RETURN regexp_replace(st || ': ' || msg || coalesce(E'\n  detail: ' || nullif(det, ''), '')
						  || coalesce(E'\n  hint: ' || nullif(hin, ''), ''),
						  '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<run>', 'g');
END
$$;

-- Waits (up to 30 s) until a query returns true: the engine works on its own time.
CREATE FUNCTION app.await(query text) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
	ok boolean;
BEGIN
	FOR i IN 1 .. 3000 LOOP
		EXECUTE query INTO ok;
		IF ok THEN
			RETURN true;
		END IF;
		PERFORM pg_sleep(0.01);
	END LOOP;
	RETURN false;
END
$$;
