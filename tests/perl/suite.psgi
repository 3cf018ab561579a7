# Plack::Test::Suite's own app (each request picks its test by the
# X-Plack-Test header), wrapped in Plack's Lint as the suite does for the
# servers it loads itself.
use Plack::Test::Suite;
use Plack::Middleware::Lint;

Plack::Middleware::Lint->wrap(Plack::Test::Suite->test_app_handler);
