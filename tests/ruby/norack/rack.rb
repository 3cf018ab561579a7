# On the load path first (ruby -I): `require "rack"` fails, as where ruby-rack
# is not installed.
raise LoadError, "cannot load such file -- rack (hidden for this test)"
