# Statistics that describe orch.steps as empty while it is full: an ANALYZE
# that ran while a big start_run transaction was open.  The engine refreshes
# them (and its plans do not depend on them), so the runs finish.
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

$node->stop;
done_testing();
