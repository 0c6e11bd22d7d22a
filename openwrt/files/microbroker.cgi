#!/usr/bin/python3 -IS
import sys; sys.path.append("%s/lib/python%d.%d/site-packages" % ((sys.prefix,) + sys.version_info[:2]))
from microbroker.cgi import run; run()
