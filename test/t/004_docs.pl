# The documentation's SQL examples run as written: every ```sql block of
# docs/*.md, in order, one psql session per file, stopping at the first error.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use OrchTest;

my $node = orch_node('docs');
my $docs = "$FindBin::RealBin/../../docs";

for my $file (sort glob("$docs/*.md"))
{
	my $text = slurp_file($file);
	my @blocks = ($text =~ /^```sql\n(.*?)^```/msg);
	next unless @blocks;
	(my $name = $file) =~ s{.*/}{};
	my $db = $name =~ s/\W/_/gr;
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	my ($rc, $out, $err) = $node->psql($db, join("\n", @blocks),
		extra_params => [ '-v', 'ON_ERROR_STOP=1' ]);
	is($rc, 0, "$name: all " . scalar(@blocks) . " sql examples run")
	  or diag("stdout:\n$out\nstderr:\n$err");
	unlike($err, qr/ERROR/, "$name: no example raised an error");
	note $out;
}

# What the api.md examples promise.
is($node->safe_psql('api_md', q{
	SELECT string_agg(status::text, ',' ORDER BY created_at) FROM orch.runs}),
	'succeeded,cancelled,succeeded,succeeded,succeeded,failed,succeeded,succeeded,succeeded,succeeded,succeeded,succeeded,succeeded,succeeded',
	'the example runs ended as the text says');
is($node->safe_psql('api_md', q{
	SELECT s.output->>'paid_by' || ':' || (s.resolution->>'action') || ':' || n.status
	  FROM orch.steps s JOIN orch.steps n ON n.run_id = s.run_id AND n.name = 'ship'
	 WHERE s.name = 'charge'}),
	'transfer:provide_input:succeeded', 'the resolved charge succeeded with the given output, and the run went on');
is($node->safe_psql('api_md', q{
	SELECT string_agg(r.business_key || ':' || (s.output->>'accepted') || ':' || b.status, ' ' ORDER BY r.business_key)
	  FROM orch.runs r JOIN orch.steps s ON s.run_id = r.run_id AND s.name = 'answer'
	  JOIN orch.steps b ON b.run_id = r.run_id AND b.name = 'book'
	 WHERE r.workflow = 'quote'}),
	'ORDER-16:true:succeeded ORDER-17:false:skipped', 'each quote took its answer, and booked only if accepted');
is($node->safe_psql('api_md', q{
	SELECT string_agg(s.output->>'crm_record', ',' ORDER BY r.input->>'order_id')
	  FROM orch.runs r JOIN orch.steps s USING (run_id)
	 WHERE s.name = 'update' AND r.input->>'order_id' IN ('13', '14')}),
	'C-1013,C-1014', 'complete_tasks gave each task its own output');
is($node->safe_psql('api_md', q{
	SELECT string_agg(s.output->>'crm_record' || ':' || a.worker, ',' ORDER BY r.input->>'order_id')
	  FROM orch.runs r JOIN orch.steps s USING (run_id) JOIN orch.attempts a USING (step_id)
	 WHERE s.name = 'update' AND r.input->>'order_id' IN ('15', '16')}),
	'C-1015:crm-adapter-3,C-1016:crm-adapter-3',
	'complete_and_claim completed each task it held with its own output, once');
is($node->safe_psql('api_md', q{
	SELECT count(*) FROM orch.attempts a JOIN orch.runs r USING (run_id) WHERE r.workflow = 'ship_order'}),
	'2', 'the redriven step failed once, without retry, then succeeded');
is($node->safe_psql('api_md', q{
	SELECT string_agg(path, ' ' ORDER BY path) FROM orch.validate_json('{"order_id": "7", "lines": [{"qty": 0}]}',
	  '{"type": "object", "required": ["order_id", "currency"],
	    "properties": {"order_id": {"type": "integer"},
	                   "lines": {"type": "array", "items": {"properties": {"qty": {"minimum": 1}}}}}}')}),
	'$ $.lines[0].qty $.order_id', 'validate_json names each violation by its path');
is($node->safe_psql('api_md', 'SELECT count(*) FROM shop.refunds WHERE order_id = 7'), '1',
	'the refund was written once');

# What the audit.md examples promise.
is($node->safe_psql('audit_md', 'SELECT count(*) FROM orch.verify_audit()'), '0',
	'the audit trail of the examples verifies');
is($node->safe_psql('audit_md', q{
	SELECT string_agg(e.operation || ':' || s.name, ',')
	  FROM orch.audit_events e JOIN orch.steps s ON s.step_id = e.step_id
	 WHERE e.table_name = 'bank.accounts'}),
	'UPDATE:pay', 'the step\'s change to the business table carries the step');

# What the workflows.md trip example promises.
is($node->safe_psql('workflows_md', q{
	SELECT string_agg(status::text, ',' ORDER BY created_at) FROM orch.runs}),
	'succeeded,failed', 'the trips ended as the text says');
is($node->safe_psql('workflows_md', q{
	SELECT string_agg(a.attempt || ':' || a.kind || ':' || a.outcome, ' ' ORDER BY a.finished_at)
	  FROM orch.attempts a JOIN orch.steps s ON s.step_id = a.step_id JOIN orch.runs r ON r.run_id = s.run_id
	 WHERE s.name = 'charge' AND r.input->>'name' = 'Ada'}),
	'1:run:failed 1:verify:succeeded 2:run:succeeded',
	'the unknown outcome was verified before the charge ran again');
is($node->safe_psql('workflows_md', q{
	SELECT string_agg(b.item || ':' || b.status, ' ' ORDER BY b.item)
	  FROM trips.bookings b JOIN orch.runs r USING (run_id) WHERE r.input->>'name' = 'Bob'}),
	'flight:cancelled hotel:cancelled', 'the declined trip was compensated');
is($node->safe_psql('workflows_md', 'SELECT count(*) FROM trips.payments'), '1',
	'one payment, for the trip that was charged');

is($node->safe_psql('api_md', q{
	SELECT string_agg(v.voter || ':' || coalesce(v.comment, '-'), ' ' ORDER BY v.voted_at)
	  FROM orch.approval_votes v JOIN orch.approvals a USING (approval_id) JOIN orch.runs r USING (run_id)
	 WHERE r.workflow = 'big_refund'}),
	'ana:matches the invoice ben:- ben:over the refund limit', 'the gate took two distinct approvers, and the second run one rejection');
is($node->safe_psql('api_md', 'SELECT run_id IS NOT NULL FROM shop.refunds WHERE order_id = 18'), 't',
	'the approved refund was written');
$node->safe_psql('api_md', 'DROP OWNED BY shop_app; DROP ROLE shop_app; DROP ROLE ana, ben, refund_approvers');
$node->stop;
done_testing();
