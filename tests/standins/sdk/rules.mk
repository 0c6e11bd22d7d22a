# Stand-in for OpenWrt's rules.mk: only what a plain package Makefile
# needs, so that its Build and install steps can run on the host
# (tests/test_openwrt.py).  BUILD_DIR and IPKG_ROOT come from the caller.

INCLUDE_DIR:=$(TOPDIR)/include
BUILD_DIR?=$(TOPDIR)/build
IPKG_ROOT?=$(BUILD_DIR)/ipkg

INSTALL_DIR:=install -d -m0755
INSTALL_BIN:=install -m0755
INSTALL_DATA:=install -m0644
INSTALL_CONF:=install -m0600
CP:=cp -fpR
FIND:=find
SED:=sed -i -e
