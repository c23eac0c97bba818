# Statistics that describe orch.steps as empty while it is full: an ANALYZE
# that ran while a big start_run transaction was open.  The engine refreshes
# them (and its plans do not depend on them), so the runs finish.  Then
# statistics that describe every run as finished, and a burst of starts,
# tasks and events: each run is still reached by its key.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use OrchTest;

my $node = orch_node('statistics', conf => "autovacuum = off\n");
orch_install_app($node, 'postgres');

# The big transaction stays open while another session analyzes the tables.
my $starter = $node->background_psql('postgres');
$starter->query_safe('BEGIN');
$starter->query_safe(
	"SELECT count(orch.start_run('chain3', jsonb_build_object('n', g))) FROM generate_series(1, 4000) g");
$node->safe_psql('postgres', 'ANALYZE orch.steps, orch.runs');
my ($pages, $tuples) = split /\|/, $node->safe_psql('postgres',
	"SELECT relpages, reltuples FROM pg_class WHERE oid = 'orch.steps'::regclass");
cmp_ok($pages, '>', 100, 'orch.steps has pages');
is($tuples, '0', 'and its statistics say it holds no row');
$starter->query_safe('COMMIT');
$starter->quit;

ok($node->poll_query_until('postgres',
	"SELECT count(*) = 4000 FROM orch.runs WHERE status = 'succeeded'", 't'),
	'every run finishes');
is($node->safe_psql('postgres', "SELECT count(*) FROM app.effects"), '12000',
	'each step once');
ok($node->log_contains('refreshing the statistics of orch.steps and orch.runs'),
	'the engine refreshed the misleading statistics');
cmp_ok($node->safe_psql('postgres',
	"SELECT reltuples FROM pg_class WHERE oid = 'orch.steps'::regclass"), '>', 0,
	'orch.steps is no longer described as empty');

# The same while another session holds orch.runs with the lock ANALYZE
# takes (as a VACUUM or an ANALYZE would): the engine goes on advancing
# runs, says once that the refresh waits, and does it once the lock is
# gone; no ANALYZE of its own reports a skipped table as a WARNING.
$node->safe_psql('postgres', 'TRUNCATE orch.runs, orch.steps, orch.attempts');
my $log_at = -s $node->logfile;
$starter = $node->background_psql('postgres');
$starter->query_safe('BEGIN');
$starter->query_safe(
	"SELECT count(orch.start_run('chain3', jsonb_build_object('m', g))) FROM generate_series(1, 4000) g");
$node->safe_psql('postgres', 'ANALYZE orch.steps, orch.runs');
my $holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN');
$holder->query_safe('LOCK TABLE orch.runs IN SHARE UPDATE EXCLUSIVE MODE');
$starter->query_safe('COMMIT');
$starter->quit;
$node->wait_for_log(qr/another session holds the lock ANALYZE needs/, $log_at);
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 4000 FROM orch.runs WHERE status = 'succeeded' AND input ? 'm'", 't'),
	'every run finishes while the statistics wait');
is($node->safe_psql('postgres',
	"SELECT reltuples FROM pg_class WHERE oid = 'orch.steps'::regclass"), '0',
	'orch.steps is still described as empty');
$holder->query_safe('ROLLBACK');
$holder->quit;
$node->wait_for_log(qr/refreshing the statistics of orch.steps and orch.runs/, $log_at);
ok($node->poll_query_until('postgres',
	"SELECT reltuples > 0 FROM pg_class WHERE oid = 'orch.steps'::regclass", 't'),
	'refreshed once the lock is gone');
my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile, $log_at);
my $waits = () = $log =~ /another session holds the lock ANALYZE needs/g;
is($waits, 1, 'the wait is logged once');
unlike($log, qr/skipping analyze/, 'no skipped table reported');

# Statistics taken while every run had finished (a quiet hour: all 4000
# have), then a burst of starts: the engine still finds each run it counts
# down by its key.  A plan made from those statistics expects one
# unfinished run, and scanning the index of unfinished runs once per batch
# looked cheap to it; with thousands of runs started, that made each batch
# read all of them.  Driven by orch.tick() in the transaction that starts
# the runs, which the workers cannot see; the transaction's own index
# statistics tell which indexes were read.
$node->safe_psql('postgres', 'ANALYZE orch.runs, orch.steps');

# Run $work in a transaction that is rolled back, then tell $outcome and how
# often the transaction scanned runs_active.
my $ticks = q{DO $$ BEGIN WHILE orch.tick(100) > 0 LOOP END LOOP; END $$;};
sub in_burst
{
	my ($work, $outcome) = @_;
	return $node->safe_psql('postgres',
		"BEGIN;\n$work\n"
		  . "SELECT ($outcome) || ', runs_active scanned '"
		  . " || pg_stat_get_xact_numscans('orch.runs_active'::regclass) || ' times';\n"
		  . "ROLLBACK");
}

is(in_burst(q{
	SELECT count(orch.start_run('chain3', jsonb_build_object('burst', g))) FROM generate_series(1, 300) g \gset
	} . $ticks,
	q{SELECT count(*) || ' runs done' FROM orch.runs WHERE input ? 'burst' AND status = 'succeeded'}),
	'300 runs done, runs_active scanned 0 times',
	'a burst after statistics of finished runs: each run counted down by its key');

# The same for tasks: a claim joins each waiting task to its run by key.
$node->safe_psql('postgres', q{
	SELECT orch.define_workflow('burst_task', '{"steps": [{"name": "work", "kind": "task", "queue": "burst"}]}')});
is(in_burst(q{
	SELECT count(orch.start_run('burst_task')) FROM generate_series(1, 300) g \gset
	} . $ticks . q{
	SELECT count(*) FROM orch.claim_tasks('burst', 'w', 300, '1 min') c
	 CROSS JOIN LATERAL orch.complete_task(c.token, '{}') done \gset
	} . $ticks,
	q{SELECT :count || ' completed, ' || count(*) || ' runs done'
	    FROM orch.runs WHERE workflow = 'burst_task' AND status = 'succeeded'}),
	'300 completed, 300 runs done, runs_active scanned 0 times',
	'a burst of tasks after statistics of finished runs: each claimed by its run\'s key');

# And for events sent by business key.
$node->safe_psql('postgres', q{
	SELECT orch.define_workflow('burst_event', '{"steps": [{"name": "answer", "kind": "wait_event", "event": "answered"}]}')});
is(in_burst(q{
	SELECT count(orch.start_run('burst_event', business_key => 'K-' || g)) FROM generate_series(1, 300) g \gset
	} . $ticks . q{
	SELECT sum(orch.send_event_by_key('burst_event', 'K-' || g, 'answered')) AS sent
	  FROM generate_series(1, 300) g \gset
	} . $ticks,
	q{SELECT :sent || ' sent, ' || count(*) || ' runs done'
	    FROM orch.runs WHERE workflow = 'burst_event' AND status = 'succeeded'}),
	'300 sent, 300 runs done, runs_active scanned 0 times',
	'events sent by business key in a burst after statistics of finished runs: found by the key');
$node->stop;
done_testing();
