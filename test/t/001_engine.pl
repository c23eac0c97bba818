# The engine worker advances runs on its own: nobody connected drives them,
# an idle engine is woken on commit, and a step that raises is recorded
# while the worker carries on.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use OrchTest;

my $node = orch_node('engine');
orch_install_app($node, 'postgres');

# Start runs and disconnect: only read-only observers connect from here on.
$node->safe_psql('postgres',
	"SELECT orch.start_run('chain3', jsonb_build_object('i', g)) FROM generate_series(1, 50) g");
$node->poll_query_until('postgres',
	"SELECT count(*) = 50 FROM orch.runs WHERE status = 'succeeded'");
is($node->safe_psql('postgres',
	"SELECT count(*) FILTER (WHERE status = 'succeeded') || '/' || count(*) FROM orch.runs"),
	'50/50', 'runs finished with no client connected');
is($node->safe_psql('postgres', 'SELECT count(*) FROM app.effects'),
	'150', 'each of the 150 steps wrote its effect once');

# An idle engine: one 3-step run, timed from the client.  No assertion on
# time (shared machines are noisy); the benchmark measures latency.
sleep(1);
my @lat;
for my $i (1 .. 5)
{
	my $t0 = time;
	my $status = $node->safe_psql('postgres', qq{
		SELECT orch.start_run('chain3', '{"idle": $i}') AS id \\gset
		SELECT orch.wait_run(:'id', '30s')});
	push @lat, (time - $t0) * 1000;
	is($status, 'succeeded', "idle run $i succeeded");
}
my $server_ms = $node->safe_psql('postgres', q{
	SELECT round(extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY finished_at - created_at)) * 1000, 2)
	  FROM orch.runs WHERE input ? 'idle'});
diag(sprintf("3-step run on an idle engine: client round trip %.1f ms (median of 5, "
	  . "psql start-up included); created to finished on the server %s ms (median)",
	(sort { $a <=> $b } @lat)[2], $server_ms));

# A step that raises fails its run; the engine worker is the same process after.
my $pid_before = $node->safe_psql('postgres', 'SELECT pid FROM orch.engine_workers');
$node->safe_psql('postgres', q{
SELECT orch.define_workflow('broken', '{"steps": [
  {"name": "boom", "kind": "sql", "function": "app.fail", "retry": {"max_attempts": 2, "initial_interval": "10ms"}},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["boom"]}]}')});
my $failed = $node->safe_psql('postgres', q{
	SELECT orch.start_run('broken') AS id \gset
	SELECT orch.wait_run(:'id', '30s')});
is($failed, 'failed', 'a run whose step raises fails');
is($node->safe_psql('postgres', q{
	SELECT string_agg(attempt || ':' || outcome || ':' || sqlstate || ':' || message, ', ' ORDER BY attempt)
	  FROM orch.attempts a JOIN orch.runs r USING (run_id) WHERE r.workflow = 'broken'}),
	'1:failed:22000:step boom always fails, 2:failed:22000:step boom always fails',
	'both attempts are recorded with SQLSTATE and message');
is($node->safe_psql('postgres', q{
	SELECT error->>'step' || ' ' || (error->>'attempt') FROM orch.runs WHERE workflow = 'broken'}),
	'boom 2', 'the run names the failing step');
is($node->safe_psql('postgres', 'SELECT pid FROM orch.engine_workers'), $pid_before,
	'the engine worker survived the failing step');
is($node->safe_psql('postgres', q{
	SELECT orch.start_run('chain3', '{"after": true}') AS id \gset
	SELECT orch.wait_run(:'id', '30s')}),
	'succeeded', 'and goes on advancing runs');

# Waiting on a run in the transaction that started it could never end: refused.
my ($rc, $stdout, $stderr) = $node->psql('postgres',
	"SELECT orch.wait_run(orch.start_run('chain3'), '1s')");
like($stderr, qr/was started or changed by the current transaction/,
	'wait_run refuses to wait for a run its own transaction started');

# Off switch: with orchestrator.enabled = off nothing advances; on again, it does.
$node->safe_psql('postgres', "ALTER SYSTEM SET orchestrator.enabled = off; SELECT pg_reload_conf()");
sleep(1);
my $held = $node->safe_psql('postgres', "SELECT orch.start_run('chain3', '{\"held\": true}')");
sleep(1);
is($node->safe_psql('postgres', "SELECT status FROM orch.runs WHERE run_id = '$held'"),
	'pending', 'a disabled engine leaves runs alone');
$node->safe_psql('postgres', "ALTER SYSTEM RESET orchestrator.enabled; SELECT pg_reload_conf()");
ok($node->poll_query_until('postgres',
	"SELECT status = 'succeeded' FROM orch.runs WHERE run_id = '$held'"),
	'enabled again, the engine finishes it');

# The settings live under a reserved prefix: a typo is refused.
my ($ret, $out, $err) = $node->psql('postgres', "SET orchestrator.batchsize = 10");
like($err, qr/invalid configuration parameter name "orchestrator.batchsize"/,
	'unknown orchestrator.* settings are rejected');

# An engine batch writes what it finished (steps, attempts, dependents
# counted down and made ready, run counters) through the tables' access
# methods where the statements would do no more than write the rows; a
# BEFORE ROW trigger on orch.steps makes it write the steps with the
# statements.  Both leave the same rows and record the same audit events.
# With the engine paused, one orch.tick() runs a fan-in's two heads in one
# claim round, so that their step counts both of its needs down at once.
$node->safe_psql('postgres', q{
	SELECT orch.define_workflow('fan_in', '{"steps": [
	  {"name": "a", "kind": "sql", "function": "app.record"},
	  {"name": "b", "kind": "sql", "function": "app.record"},
	  {"name": "c", "kind": "sql", "function": "app.record", "needs": ["a", "b"]},
	  {"name": "d", "kind": "sql", "function": "app.record", "needs": ["c"]}]}');
	CREATE TABLE app.passed (status orch.step_status, pending_needs int);
	CREATE FUNCTION app.pass_step() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO app.passed VALUES (NEW.status, NEW.pending_needs);
		RETURN NEW;
	END
	$$;
	CREATE TABLE app.fan_in (path text PRIMARY KEY, run_id uuid NOT NULL);
	ALTER SYSTEM SET orchestrator.enabled = off;
	SELECT pg_reload_conf();
});
sleep(1);
$node->safe_psql('postgres', q{
	INSERT INTO app.fan_in SELECT 'direct', orch.start_run('fan_in', '{"path": "direct"}');
});
$node->safe_psql('postgres', 'SELECT orch.tick(100)');
$node->safe_psql('postgres', q{
	CREATE TRIGGER pass_step BEFORE UPDATE ON orch.steps FOR EACH ROW EXECUTE FUNCTION app.pass_step();
	INSERT INTO app.fan_in SELECT 'statements', orch.start_run('fan_in', '{"path": "statements"}');
});
$node->safe_psql('postgres', 'SELECT orch.tick(100)');
$node->safe_psql('postgres', q{
	DROP TRIGGER pass_step ON orch.steps;
	ALTER SYSTEM RESET orchestrator.enabled;
	SELECT pg_reload_conf();
});
is($node->safe_psql('postgres', q{
	SELECT f.path || ': ' || r.status || ', ' ||
		   string_agg(s.name || ' ' || s.status || ' ' || s.pending_needs || '/' || s.needs_ok || ' ' || s.attempt,
					  ', ' ORDER BY s.name)
	  FROM app.fan_in f JOIN orch.runs r USING (run_id) JOIN orch.steps s USING (run_id)
	 GROUP BY f.path, r.status ORDER BY f.path}),
	"direct: succeeded, a succeeded 0/0 1, b succeeded 0/0 1, c succeeded 0/2 1, d succeeded 0/1 1\n"
	  . "statements: succeeded, a succeeded 0/0 1, b succeeded 0/0 1, c succeeded 0/2 1, d succeeded 0/1 1",
	'a fan-in run by one tick finishes the same with and without the statements');

# Each run's events after its start, in the order recorded, with the
# values that differ from run to run (ids, times, outputs, the worker)
# left out.
my $events = q{
	SELECT string_agg(format('%s %s %s old %s new %s', e.table_name, e.operation, s.name,
							 e.old_row - v.volatile, e.new_row - v.volatile), E'\n' ORDER BY e.audit_id)
	  FROM app.fan_in f
	  JOIN orch.audit_log e ON e.run_id = f.run_id
	  LEFT JOIN orch.steps s ON s.step_id = (e.row_key->>'step_id')::bigint
	 CROSS JOIN (SELECT '{step_id,run_id,started_at,finished_at,wake_at,attempt_started_at,output,worker}'::text[]
				 AS volatile) v
	 WHERE f.path = :'path' AND (e.operation <> 'INSERT' OR e.table_name = 'orch.attempts')};
my $direct = $node->safe_psql('postgres', "\\set path direct\n$events");
my $statements = $node->safe_psql('postgres', "\\set path statements\n$events");
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM app.fan_in f
	  JOIN orch.audit_log e USING (run_id)
	  JOIN orch.steps s ON s.step_id = (e.row_key->>'step_id')::bigint
	 WHERE f.path = 'direct' AND s.name = 'c' AND e.operation = 'UPDATE'
	   AND (e.old_row->>'pending_needs')::int = 2 AND (e.new_row->>'pending_needs')::int = 0
	   AND e.new_row->>'status' = 'ready'}),
	'1', 'the fan-in step counted both of its needs down in one write');
is($node->safe_psql('postgres', q{
	SELECT string_agg(status || ' ' || pending_needs || ' ' || n, ', ' ORDER BY status, pending_needs)
	  FROM (SELECT status, pending_needs, count(*) AS n FROM app.passed GROUP BY 1, 2) p}),
	'ready 0 2, succeeded 0 4',
	'with the trigger, the statements wrote the four steps finished and the two made ready');
is(($direct =~ tr/\n//) + 1, 11,
	'the run by one tick: four steps finished, their four attempts, two dependents made ready, the run');
is($direct, $statements, 'the access methods and the statements record the same events');

# A batch follows the runs it takes: its first round leaves room for the
# steps they will make ready, and its later rounds take those before any
# other due step.  A backlog of 300 chain3 runs, started while the engine is
# paused, through batches of 30 steps: once the worker has measured that
# two steps follow each first one (its first two batches leave the next
# steps of 45 runs to later batches), a batch takes 10 runs and finishes
# them, where taking the due steps in order would run the backlog's first
# steps first and finish no run in one batch.
$node->safe_psql('postgres', q{
	ALTER SYSTEM SET orchestrator.enabled = off;
	ALTER SYSTEM SET orchestrator.batch_size = 30;
	SELECT pg_reload_conf();
});
sleep(1);
$node->safe_psql('postgres',
	"SELECT orch.start_run('chain3', jsonb_build_object('follow', g)) FROM generate_series(1, 300) g");
$node->safe_psql('postgres', 'ALTER SYSTEM RESET orchestrator.enabled; SELECT pg_reload_conf()');
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 300 FROM orch.runs WHERE input ? 'follow' AND status = 'succeeded'"),
	'the backlog of 300 runs finished');
my $finished = q{
	SELECT e.xid, e.run_id FROM orch.audit_log e JOIN orch.runs r USING (run_id)
	 WHERE r.input ? 'follow' AND e.table_name = 'orch.steps' AND e.operation = 'UPDATE'
	   AND e.new_row->>'status' = 'succeeded'};
my ($whole, $largest) = split /\|/, $node->safe_psql('postgres', qq{
	SELECT (SELECT count(*) FROM (SELECT run_id FROM ($finished) f GROUP BY run_id
								   HAVING count(DISTINCT xid) = 1) w),
		   (SELECT max(n) FROM (SELECT count(*) AS n FROM ($finished) f GROUP BY xid) b)});
cmp_ok($whole, '>=', 200, "a batch finishes the runs it takes ($whole of 300 in one transaction)");
cmp_ok($largest, '<=', 30, "no batch advances more than batch_size steps ($largest at most)");
$node->safe_psql('postgres', 'ALTER SYSTEM RESET orchestrator.batch_size; SELECT pg_reload_conf()');

$node->stop;
done_testing();
