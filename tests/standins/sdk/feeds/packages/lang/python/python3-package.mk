# Stand-in for openwrt/packages' lang/python/python3-package.mk: the
# Py3Package part (byte-compile, drop the sources, a -src package with
# them), run with the host's python3.  PYTHON3_VERSION comes from the
# caller, so that the .pyc files fit the python that tests them.

PYTHON3_VERSION?=3
PYTHON3_PKG_DIR:=/usr/lib/python$(PYTHON3_VERSION)/site-packages
HOST_PYTHON3_BIN?=python3

define Python3/CompileAll
	$(HOST_PYTHON3_BIN) -m compileall -q -b -d '/' $(1)
endef

define Python3/DeleteSourceFiles
	$(FIND) $(1) -type f -name '*.py' -delete
endef

define Py3Package
  define Package/$(1)-src
    $(call Package/$(1))
    DEPENDS:=
    PKGARCH:=all
    TITLE+= (sources)
  endef

  define Package/$(1)/install
	$$(call Py3Package/$(1)/install,$$(1))
	$(INSTALL_DIR) $$(1)$(PYTHON3_PKG_DIR)
	$(CP) $(PKG_INSTALL_DIR)$(PYTHON3_PKG_DIR)/. $$(1)$(PYTHON3_PKG_DIR)/
	$$(call Python3/CompileAll,$$(1))
	$$(call Python3/DeleteSourceFiles,$$(1))
  endef

  define Package/$(1)-src/install
	$(INSTALL_DIR) $$(1)$(PYTHON3_PKG_DIR)
	$(CP) $(PKG_INSTALL_DIR)$(PYTHON3_PKG_DIR)/. $$(1)$(PYTHON3_PKG_DIR)/
  endef
endef
