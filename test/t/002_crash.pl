# Crash safety: kill -9 of an engine worker, and an immediate stop of the
# whole server, in the middle of a load, and kill -9 in the middle of
# compensations.  Every run still finishes, each sql
# step's effect is written exactly once (it commits with the step's state),
# and nothing is left running.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use OrchTest;

# PostgreSQL::Test::Cluster turns restart_after_crash off; a crash-restart is the point here.
my $node = orch_node('crash', conf => "orchestrator.batch_size = 50\nrestart_after_crash = on\n");
orch_install_app($node, 'postgres');

# Slow the steps a little so that the load lasts long enough to be hit.
$node->safe_psql('postgres', q{
CREATE OR REPLACE FUNCTION app.record(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	SELECT pg_sleep(0.0003);
	INSERT INTO app.effects VALUES ((ctx->>'run_id')::uuid, ctx->>'step', (ctx->>'attempt')::int);
	SELECT jsonb_build_object('step', ctx->'step')
$$;
});

# Start $n runs labelled $label; wait until some but not all steps are done.
sub start_load
{
	my ($label, $n) = @_;
	$node->safe_psql('postgres', qq{
		SELECT orch.start_run('chain3', jsonb_build_object('load', '$label', 'i', g))
		  FROM generate_series(1, $n) g});
	$node->poll_query_until('postgres', qq{
		SELECT count(*) >= 300 FROM app.effects e JOIN orch.runs r USING (run_id)
		 WHERE r.input->>'load' = '$label'})
	  or die "load $label does not advance";
	my $done = $node->safe_psql('postgres', qq{
		SELECT count(*) FROM app.effects e JOIN orch.runs r USING (run_id)
		 WHERE r.input->>'load' = '$label'});
	note "load $label: $done of " . (3 * $n) . " steps done when hit";
	return $done;
}

# After the hit: all runs finish, effects are exact, nothing hangs.
sub check_load
{
	my ($label, $n) = @_;
	ok($node->poll_query_until('postgres', qq{
		SELECT count(*) = 0 FROM orch.runs
		 WHERE input->>'load' = '$label' AND status NOT IN ('succeeded', 'failed', 'cancelled')}),
		"load $label: every run reached a final status");
	is($node->safe_psql('postgres', qq{
		SELECT count(*) FILTER (WHERE status = 'succeeded') FROM orch.runs WHERE input->>'load' = '$label'}),
		$n, "load $label: all $n runs succeeded");
	is($node->safe_psql('postgres', qq{
		SELECT count(*) || ' effects, ' || count(DISTINCT (run_id, step)) || ' distinct, max '
			   || max(c) || ' per step'
		  FROM (SELECT e.run_id, e.step, count(*) OVER (PARTITION BY e.run_id, e.step) AS c
				  FROM app.effects e JOIN orch.runs r USING (run_id)
				 WHERE r.input->>'load' = '$label') x}),
		(3 * $n) . ' effects, ' . (3 * $n) . ' distinct, max 1 per step',
		"load $label: each sql step's effect was written exactly once");
	is($node->safe_psql('postgres', qq{
		SELECT count(*) FROM orch.steps s JOIN orch.runs r USING (run_id)
		 WHERE r.input->>'load' = '$label' AND s.status <> 'succeeded'}),
		'0', "load $label: no step is left running, ready or pending");
	is($node->safe_psql('postgres', qq{
		SELECT count(*) FROM orch.attempts a JOIN orch.runs r USING (run_id)
		 WHERE r.input->>'load' = '$label'}),
		3 * $n, "load $label: one committed attempt per step");
}

# 1. kill -9 the engine worker: the postmaster resets every backend, the
#    launcher comes back after recovery and starts a new engine.
my $done = start_load('kill9', 2000);
my $pid = $node->safe_psql('postgres', 'SELECT pid FROM orch.engine_workers');
ok(kill('KILL', $pid), "sent SIGKILL to engine worker $pid");
cmp_ok($done, '<', 6000, 'the kill came in the middle of the load');
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 AND min(pid) <> $pid FROM orch.engine_workers")
  or die 'no new engine worker after the crash';
check_load('kill9', 2000);

# 2. Immediate stop (no shutdown checkpoint: WAL replay on start).
$done = start_load('immediate', 2000);
$node->stop('immediate');
cmp_ok($done, '<', 6000, 'the stop came in the middle of the load');
$node->start;
check_load('immediate', 2000);

# 3. kill -9 in the middle of compensations: the batch that was undoing
#    steps rolls back with its effects, and after the restart every step is
#    undone exactly once, latest first, each a committed attempt.
$node->safe_psql('postgres', q{
CREATE TABLE app.undone (run_id uuid, step text, n bigserial);
CREATE FUNCTION app.undo_slowly(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	SELECT pg_sleep(0.05);
	INSERT INTO app.undone (run_id, step) VALUES ((ctx->>'run_id')::uuid, ctx->>'step');
	SELECT '{}'::jsonb
$$;
SELECT orch.define_workflow('saga', '{"steps": [
  {"name": "book", "kind": "sql", "function": "app.record", "compensate": "app.undo_slowly"},
  {"name": "ship", "kind": "sql", "function": "app.record", "compensate": "app.undo_slowly",
   "needs": ["book"]},
  {"name": "pay", "kind": "sql", "function": "app.fail", "needs": ["ship"],
   "retry": {"max_attempts": 1}}]}');
SELECT count(orch.start_run('saga', jsonb_build_object('load', 'saga', 'i', g)))
  FROM generate_series(1, 100) g;
});
$node->poll_query_until('postgres', q{
	SELECT count(*) > 0 FROM pg_stat_activity
	 WHERE backend_type = 'orchestrator engine' AND wait_event = 'PgSleep'})
  or die 'no compensation seen running';
$pid = $node->safe_psql('postgres', 'SELECT pid FROM orch.engine_workers');
ok(kill('KILL', $pid), "sent SIGKILL to engine worker $pid while it compensated");
ok($node->poll_query_until('postgres', q{
	SELECT count(*) = 200 FROM orch.steps s JOIN orch.runs r USING (run_id)
	 WHERE r.input->>'load' = 'saga' AND s.status = 'compensated'}),
	'saga: every booked and shipped step was compensated after the restart');
is($node->safe_psql('postgres', q{
	SELECT count(*) || ' undone, ' || count(DISTINCT (run_id, step)) || ' distinct' FROM app.undone}),
	'200 undone, 200 distinct', 'saga: each compensation took effect exactly once');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM app.undone u
	  JOIN app.undone b ON b.run_id = u.run_id AND b.step = 'book' AND u.step = 'ship'
	 WHERE u.n > b.n}),
	'0', 'saga: within each run, ship was undone before book');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM orch.attempts a JOIN orch.runs r USING (run_id)
	 WHERE r.input->>'load' = 'saga' AND a.kind = 'compensate' AND a.outcome = 'succeeded'}),
	'200', 'saga: one committed compensate attempt per step');

ok($node->log_contains('orchestrator launcher started'), 'the launcher logged its start');

$node->stop;
done_testing();
