# Stand-in for OpenWrt's include/package.mk.  Targets:
#   prepare, compile          Build/Prepare, Build/Compile
#   install-NAME              Package/NAME/install into $(IPKG_ROOT)/NAME
#   info-NAME                 the package's metadata, one KEY=value a line
#   postinst-NAME             Package/NAME/postinst into $(IPKG_ROOT)/NAME.postinst

PKG_BUILD_DIR?=$(BUILD_DIR)/$(PKG_NAME)-$(PKG_VERSION)
PKG_INSTALL_DIR?=$(PKG_BUILD_DIR)/ipkg-install

Build/Prepare=
Build/Configure=
Build/Compile=

.PHONY: prepare compile

prepare:
	$(Build/Prepare)

compile: prepare
	$(Build/Configure)
	$(Build/Compile)

# $(call) expands left to right: the metadata is read before the result
# is evaluated, hence single $ there.
define BuildPackage
$(foreach v,SECTION CATEGORY SUBMENU TITLE DEPENDS PKGARCH,$(eval $(v):=))
$(eval $(Package/$(1)))
INFO_$(1):=SECTION=$(SECTION)|CATEGORY=$(CATEGORY)|SUBMENU=$(SUBMENU)|TITLE=$(strip $(TITLE))|DEPENDS=$(strip $(DEPENDS))|PKGARCH=$(PKGARCH)|CONFFILES=$(strip $(Package/$(1)/conffiles))
PACKAGES+=$(1)

.PHONY: install-$(1) info-$(1) postinst-$(1)
install-$(1): compile
	rm -rf $(IPKG_ROOT)/$(1)
	mkdir -p $(IPKG_ROOT)/$(1)
	$$(call Package/$(1)/install,$(IPKG_ROOT)/$(1))

info-$(1):
	@printf '%s\n' '$$(subst |,' ',$$(INFO_$(1)))'

postinst-$(1):
	@: $$(shell mkdir -p $(IPKG_ROOT))$$(file >$(IPKG_ROOT)/$(1).postinst,$$(Package/$(1)/postinst))
endef
